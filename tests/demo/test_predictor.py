"""Tests of demo/predictor.py: class-name modes, input checks and streamed predictions."""

import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T

from predictor import (
    Predictor,
    check_class_names,
    label_dtype,
    parse_class_names,
)
from skysense_o.data.datasets.register_benchmarks import CLASS_LISTS_DIR, load_class_list
from skysense_o.utils.image_io import read_image
from skysense_o.utils.weights import CheckpointMismatchError

from . import TINY_OPTS, save_random_checkpoint

NAMES = ["building", "road", "water", "tree"]
NO_RESIZE = ("INPUT.MIN_SIZE_TEST", "0")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("weights") / "random.pth")


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(opts=[*TINY_OPTS, *NO_RESIZE], weights=str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def sample(samples_dir):
    return read_image(samples_dir / "demo" / "neon_osbs_029.png")


def _model_pipeline(predictor, image, names, mode):
    """Probabilities from the model's own forward, fed as the evaluation mapper feeds it."""
    resized = image
    if predictor.min_size > 0:
        resize = T.ResizeShortestEdge(predictor.min_size, predictor.max_size)
        resized = resize.get_transform(image).apply_image(image)
    inputs = {
        "image": torch.as_tensor(resized.transpose(2, 0, 1).copy()),
        "height": image.shape[0],
        "width": image.shape[1],
        "texts": list(names),
    }
    model = predictor.model
    saved_mode = model.inference_mode
    model.inference_mode = mode
    try:
        return model([inputs])[0]["sem_seg"].numpy()
    finally:
        model.inference_mode = saved_mode


# ---- class names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, error, shown",
    [
        ([], ValueError, "empty"),
        (["road", ""], ValueError, "''"),
        (["road", "   "], ValueError, "'   '"),
        (["road", "water", "Road"], ValueError, "'Road'"),
        (["water body", "water  body"], ValueError, "'water  body'"),
        ("road", TypeError, "'road'"),
        (["road", 3], TypeError, "3"),
    ],
)
def test_check_class_names_rejects(names, error, shown):
    with pytest.raises(error) as raised:
        check_class_names(names)
    assert shown in str(raised.value)


def test_parse_free_names():
    vocabulary = parse_class_names(" building, road ,water body ")
    assert vocabulary.names == ["building", "road", "water body"]
    assert vocabulary.synonyms == [[], [], []]


def test_parse_single_name_stays_one_class():
    assert parse_class_names("solar panel").names == ["solar panel"]
    assert parse_class_names("building").names == ["building"]


def test_parse_open_world_is_sky5k_list(class_lists_dir):
    source = json.loads((class_lists_dir / "sky5k.json").read_text(encoding="utf-8"))
    expected = source["lists"][0]["classes"]
    names = parse_class_names("open_world").names
    assert len(names) == 218
    assert names == expected


def test_parse_open_world_uses_graph(tmp_path):
    graph = tmp_path / "skysa_graph.jsonl"
    graph.write_text(
        '("relationship"{tuple_delimiter}"Tree"{tuple_delimiter}"shrub"{tuple_delimiter}"8")\n'
        '("relationship"{tuple_delimiter}"pond"{tuple_delimiter}"tree"{tuple_delimiter}"2")\n',
        encoding="utf-8",
    )
    vocabulary = parse_class_names("open_world", graph_file=str(graph))
    assert vocabulary.names == ["pond", "shrub", "Tree"]


@pytest.mark.parametrize("benchmark", ["potsdam", "loveda", "isaid"])
def test_parse_benchmark_dataset(benchmark):
    class_list = load_class_list(benchmark)
    vocabulary = parse_class_names(f"{benchmark}_dataset")
    assert vocabulary.names == list(class_list.classes)
    assert vocabulary.synonyms == [list(s) for s in class_list.synonyms]


def test_parse_combination_appends_free_names():
    vocabulary = parse_class_names("potsdam_dataset,solar panel")
    potsdam = list(load_class_list("potsdam").classes)
    assert vocabulary.names == potsdam + ["solar panel"]
    assert vocabulary.synonyms[-1] == []


def test_parse_combination_removes_repeats(caplog):
    with caplog.at_level(logging.WARNING, logger="predictor"):
        vocabulary = parse_class_names("loveda_dataset,potsdam_dataset,Building")
    loveda = list(load_class_list("loveda").classes)
    potsdam = list(load_class_list("potsdam").classes)
    expected = loveda + [name for name in potsdam if name not in loveda]
    assert vocabulary.names == expected
    assert len(set(vocabulary.names)) == len(vocabulary.names)
    assert "'Building'" in caplog.text
    assert "Removed 2 repeated class names" in caplog.text


def test_parse_repeats_merge_synonyms():
    vocabulary = parse_class_names("potsdam_dataset,vaihingen_dataset")
    assert vocabulary.names == list(load_class_list("potsdam").classes)
    synonyms = load_class_list("vaihingen").synonyms
    for merged, extra in zip(vocabulary.synonyms, synonyms):
        assert set(extra) <= set(merged)


def test_parse_warns_on_misspelt_list(caplog):
    with caplog.at_level(logging.WARNING):
        vocabulary = parse_class_names("potsdam_datset,open_wrld,solar_panel,road")
    # Misspelt list names stay class names, but each gets a warning that names the list.
    assert vocabulary.names == ["potsdam_datset", "open_wrld", "solar_panel", "road"]
    assert "'potsdam_datset' is used as one class name" in caplog.text
    assert "'potsdam_dataset'" in caplog.text
    assert "'open_world'" in caplog.text
    assert "solar_panel" not in caplog.text


@pytest.mark.parametrize(
    "text, shown",
    [
        ("", "''"),
        ("   ", "'   '"),
        ("road,,water", "entry 2 of 'road,,water'"),
        ("building,", "entry 2 of 'building,'"),
        ("atlantis_dataset", "'atlantis_dataset'"),
    ],
)
def test_parse_rejects(text, shown):
    with pytest.raises(ValueError) as raised:
        parse_class_names(text)
    assert shown in str(raised.value)


def test_parse_unknown_benchmark_lists_known():
    with pytest.raises(ValueError, match="potsdam_dataset"):
        parse_class_names("atlantis_dataset")


def test_open_world_file_is_a_class_list():
    class_list = load_class_list("open_world", CLASS_LISTS_DIR)
    assert len(class_list.classes) == 218
    assert class_list.classes[:3] == ("tree", "building", "grassland")


# ---- streaming resize and label types ------------------------------------------------------


def test_label_dtype_by_class_count():
    assert label_dtype(4) == np.uint8
    assert label_dtype(255) == np.uint8
    assert label_dtype(256) == np.uint16
    assert label_dtype(65535) == np.uint16
    with pytest.raises(ValueError, match="65536"):
        label_dtype(65536)


# ---- the predictor -------------------------------------------------------------------------


def test_predict_labels_and_probabilities(predictor, sample):
    image = sample[:50, :70]
    result = predictor.predict(image, NAMES, return_probabilities=True)
    assert result.labels.shape == (50, 70)
    assert result.labels.dtype == np.uint8
    assert result.class_names == NAMES
    assert result.probabilities.shape == (4, 50, 70)
    assert result.probabilities.dtype == np.float32
    assert result.probabilities.min() >= 0.0
    assert result.probabilities.max() <= 1.0
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(axis=0))
    assert predictor.predict(image, NAMES).probabilities is None


# 90 x 130 takes 2 x 3 windows of 64 pixels; 40 x 100 is padded to the window's height.
@pytest.mark.parametrize("height, width", [(90, 130), (40, 100)])
def test_sliding_equals_model_sliding(predictor, sample, height, width):
    image = sample[:height, :width]
    result = predictor.predict(image, NAMES, sliding_window=True, return_probabilities=True)
    expected = _model_pipeline(predictor, image, NAMES, "sliding")
    np.testing.assert_array_equal(result.probabilities, expected)
    np.testing.assert_array_equal(result.labels, expected.argmax(axis=0))


def test_whole_equals_model_whole(predictor, sample):
    image = sample[:70, :90]
    result = predictor.predict(image, NAMES, sliding_window=False, return_probabilities=True)
    expected = _model_pipeline(predictor, image, NAMES, "whole")
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)


def test_whole_labels_alone_match_probabilities(predictor, sample):
    # Without probabilities, the whole-image mode interpolates only the candidate classes of
    # each cell; its labels must be those of the full probabilities.
    image = sample[:70, :90]
    with_probabilities = predictor.predict(image, NAMES, sliding_window=False,
                                           return_probabilities=True)
    labels_only = predictor.predict(image, NAMES, sliding_window=False)
    probabilities = with_probabilities.probabilities
    top_two = np.sort(probabilities, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-5
    assert clear.mean() > 0.99
    assert labels_only.labels.dtype == np.uint8
    np.testing.assert_array_equal(labels_only.labels[clear],
                                  probabilities.argmax(axis=0)[clear])


def test_sliding_with_resize_and_global_view(checkpoint, sample):
    opts = [*TINY_OPTS, "INPUT.MIN_SIZE_TEST", "72", "INPUT.MAX_SIZE_TEST", "120",
            "MODEL.SKYSENSE_O.INFERENCE.GLOBAL_WEIGHT", "0.25"]
    resizing = Predictor(opts=opts, weights=str(checkpoint), device="cpu")
    image = sample[:110, :150]
    result = resizing.predict(image, NAMES, sliding_window=True, return_probabilities=True)
    expected = _model_pipeline(resizing, image, NAMES, "sliding")
    assert result.probabilities.shape == expected.shape == (4, 110, 150)
    # The streamed resize interpolates rows, then columns; the model resizes in one call.
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    top_two = np.sort(expected, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-4
    np.testing.assert_array_equal(result.labels[clear], expected.argmax(axis=0)[clear])


def test_sliding_streams_window_sized_blocks(predictor, sample):
    image = np.ascontiguousarray(np.concatenate([sample[:, :64]] * 2)[:300])
    blocks = []

    def record(row_start, row_end, scores):
        assert scores.shape == (4, row_end - row_start, 64)
        blocks.append((row_start, row_end))

    predictor.predict_rows(image, NAMES, record, sliding_window=True)
    assert blocks[0][0] == 0
    assert blocks[-1][1] == 300
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert max(end - start for start, end in blocks) <= predictor.model.window


def test_synonyms_match_retrieval_augmentation(predictor, sample):
    image = sample[:64, :80]
    synonyms = [["path", "roadway"], []]
    merged = predictor.predict(image, ["road", "water"], synonyms=synonyms,
                               return_probabilities=True)
    plain = predictor.predict(image, ["road", "water"], return_probabilities=True)

    model = predictor.model
    inputs = {"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": 64,
              "width": 80, "texts": ["road", "water"], "synonyms": synonyms}
    model.retrieval_augmentation = True
    try:
        expected = model([inputs])[0]["sem_seg"].numpy()
    finally:
        model.retrieval_augmentation = False
    np.testing.assert_array_equal(merged.probabilities, expected)
    assert not np.array_equal(merged.probabilities, plain.probabilities)


def test_text_embeddings_are_cached(predictor, sample):
    image = sample[:64, :64]
    names = ["pond", "roof", "lawn"]
    predictor.predict(image, names)
    before = predictor.model.text_embedder.cache_info()
    predictor.predict(image, names)
    after = predictor.model.text_embedder.cache_info()
    assert after.misses == before.misses
    assert after.hits == before.hits + 1


@pytest.mark.parametrize(
    "image, error, shown",
    [
        (np.zeros((8, 8, 3), dtype=np.float32), ValueError, "float32"),
        (np.zeros((8, 8), dtype=np.uint8), ValueError, "(8, 8)"),
        (np.zeros((8, 8, 4), dtype=np.uint8), ValueError, "(8, 8, 4)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), ValueError, "(0, 8, 3)"),
        ([[0, 0, 0]], TypeError, "list"),
    ],
)
def test_predict_rejects_bad_image(predictor, image, error, shown):
    with pytest.raises(error) as raised:
        predictor.predict(image, NAMES)
    assert shown in str(raised.value)


def test_predict_rejects_repeated_names(predictor, sample):
    with pytest.raises(ValueError, match="'Water'"):
        predictor.predict(sample[:32, :32], ["water", "road", "Water"])


def test_random_weights_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="predictor"):
        Predictor(opts=list(TINY_OPTS), device="cpu")
    assert "running with RANDOM weights" in caplog.text


def test_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        Predictor(opts=list(TINY_OPTS), weights=str(missing), device="cpu")


def test_mismatched_checkpoint_is_named(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {"unrelated.weight": torch.zeros(2)}}, wrong)
    with pytest.raises(CheckpointMismatchError) as raised:
        Predictor(opts=list(TINY_OPTS), weights=str(wrong), device="cpu")
    assert "wrong.pth" in str(raised.value)
    assert "unrelated.weight" in str(raised.value)


@pytest.mark.parametrize("device, shown", [("tpu:x", "'tpu:x'"), ("cuda:99", "'cuda:99'")])
def test_bad_device_is_rejected(device, shown):
    with pytest.raises(ValueError) as raised:
        Predictor(opts=list(TINY_OPTS), device=device)
    assert shown in str(raised.value)


def test_low_memory_load_matches_normal_load(checkpoint, predictor, sample):
    low_memory = Predictor(
        opts=[*TINY_OPTS, *NO_RESIZE, "MODEL.SKYSENSE_O.LOW_MEMORY_LOAD", True],
        weights=str(checkpoint), device="cpu",
    )
    names = ["building", "road", "water"]
    image = sample[:96, :128]

    expected = predictor.predict(image, names, return_probabilities=True)
    actual = low_memory.predict(image, names, return_probabilities=True)

    assert np.array_equal(actual.labels, expected.labels)
    assert np.allclose(actual.probabilities, expected.probabilities, atol=1e-6)
