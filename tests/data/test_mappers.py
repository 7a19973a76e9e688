"""Tests of the training mapper (skysa_semantic) and the test mapper (skysense_test)."""

import random
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from PIL import Image

from skysense_o.config import add_skysense_o_config
from skysense_o.data.dataset_mappers import MAPPER_REGISTRY
from skysense_o.data.dataset_mappers.skysa_semantic_mapper import (
    AUG_IGNORE,
    SkySASemanticDatasetMapper,
)
from skysense_o.data.dataset_mappers.test_mapper import SkySenseTestDatasetMapper
from skysense_o.data.datasets.register_folder import register_folder_dataset
from skysense_o.data.datasets.register_skysa import register_skysa_folder, unregister_dataset
from skysense_o.utils.image_io import read_image, read_label

DUBAI_CLASSES = ["building", "land (unpaved area)", "road", "vegetation", "water"]
STEM = "dubai_t1_009"


@pytest.fixture
def dataset_name():
    name = f"test_mapper_{uuid.uuid4().hex[:8]}"
    yield name
    unregister_dataset(name)


@pytest.fixture
def dubai_dict(samples_dir):
    root = samples_dir / "dubai_aerial"
    return {
        "file_name": str(root / "images" / f"{STEM}.jpg"),
        "sem_seg_file_name": str(root / "labels" / f"{STEM}.png"),
        "label_format": "index",
        "class_names": list(DUBAI_CLASSES),
        "dataset_name": "dubai_test",
    }


def make_mapper(augmentations, **kwargs):
    kwargs.setdefault("vocabularies", {"dubai_test": DUBAI_CLASSES + ["sand", "tree"]})
    return SkySASemanticDatasetMapper(augmentations=augmentations, **kwargs)


def remap(label: np.ndarray, lookup: dict, ignore: int) -> np.ndarray:
    out = np.full(label.shape, ignore, dtype=np.int64)
    for value, position in lookup.items():
        out[label == value] = position
    return out


def training_cfg(**overrides):
    cfg = get_cfg()
    add_skysense_o_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (384,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (320, 320)
    cfg.DATASETS.SKYSA.TEXT_BATCH = 8
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def test_crop_flip_alignment(dubai_dict):
    image = read_image(dubai_dict["file_name"])
    label = read_label(dubai_dict["sem_seg_file_name"])
    x0, y0, w, h = 100, 50, 320, 256
    mapper = make_mapper([T.CropTransform(x0, y0, w, h), T.HFlipTransform(w)], text_batch=7)
    out = mapper.map(dubai_dict)

    expected_image = image[y0 : y0 + h, x0 : x0 + w][:, ::-1]
    expected_label = label[y0 : y0 + h, x0 : x0 + w][:, ::-1]
    assert out["image"].dtype == torch.uint8
    assert out["image"].shape == (3, h, w)
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), expected_image)
    assert out["sem_seg"].dtype == torch.int64
    identity = {k: k for k in range(5)}
    assert np.array_equal(out["sem_seg"].numpy(), remap(expected_label, identity, 255))
    assert out["texts"][:5] == DUBAI_CLASSES
    assert sorted(out["texts"][5:]) == ["sand", "tree"]
    assert out["graph_sampled"] is False
    assert (out["height"], out["width"]) == (644, 797)
    assert out["file_name"] == dubai_dict["file_name"]


def test_remap_repeated_names_and_ignore(dubai_dict):
    # Value 3 repeats "building" (case differs), so its pixels take position 0, and positions
    # follow the unique names; ignored pixels take the configured ignore value.
    dubai_dict["class_names"] = ["building", "land (unpaved area)", "road", "Building", "water"]
    label = read_label(dubai_dict["sem_seg_file_name"])
    mapper = make_mapper([], ignore_value=65535, vocabularies={})
    out = mapper.map(dubai_dict)
    assert out["texts"] == ["building", "land (unpaved area)", "road", "water"]
    expected = remap(label, {0: 0, 1: 1, 2: 2, 3: 0, 4: 3}, 65535)
    assert np.array_equal(out["sem_seg"].numpy(), expected)
    assert (out["sem_seg"] == 65535).sum().item() == (label == 255).sum()
    assert (label == 255).sum() > 0


def test_seeded_config_run_matches_manual_augmentation(dubai_dict, dataset_name):
    cfg = training_cfg(**{"INPUT.COLOR_AUG_SSD": False})
    cfg.DATASETS.TRAIN = ()
    mapper = MAPPER_REGISTRY.get("skysa_semantic")(cfg, True)
    np.random.seed(3)
    random.seed(3)
    out = mapper.map(dubai_dict)

    np.random.seed(3)
    random.seed(3)
    label = read_label(dubai_dict["sem_seg_file_name"])
    aug_input = T.AugInput(read_image(dubai_dict["file_name"]), sem_seg=label)
    mapper.augmentations(aug_input)
    height, width = aug_input.image.shape[:2]
    assert out["image"].shape == (3, 320, 320)
    out_image = out["image"][:, :height, :width].permute(1, 2, 0).numpy()
    assert np.array_equal(out_image, aug_input.image)
    expected = remap(aug_input.sem_seg, {k: k for k in range(5)}, 255)
    assert np.array_equal(out["sem_seg"][:height, :width].numpy(), expected)


def test_colour_augmentation_keeps_label(dubai_dict):
    cfg = training_cfg()
    cfg.DATASETS.TRAIN = ()
    mapper = SkySASemanticDatasetMapper(cfg, True)
    assert any("ColorAugSSD" in repr(aug) for aug in mapper.augmentations.augs)
    for seed in range(3):
        np.random.seed(seed)
        random.seed(seed)
        with_colour = mapper.map(dubai_dict)
        np.random.seed(seed)
        random.seed(seed)
        label = read_label(dubai_dict["sem_seg_file_name"])
        aug_input = T.AugInput(read_image(dubai_dict["file_name"]), sem_seg=label)
        mapper.augmentations(aug_input)
        height, width = aug_input.sem_seg.shape
        expected = remap(aug_input.sem_seg, {k: k for k in range(5)}, 255)
        assert np.array_equal(with_colour["sem_seg"][:height, :width].numpy(), expected)


def test_padding_values(dubai_dict):
    image = read_image(dubai_dict["file_name"])
    label = read_label(dubai_dict["sem_seg_file_name"])
    mapper = make_mapper([], pad_size=(700, 800), size_divisibility=32, ignore_value=254)
    out = mapper.map(dubai_dict)
    assert out["image"].shape == (3, 704, 800)
    assert out["sem_seg"].shape == (704, 800)
    assert torch.all(out["image"][:, 644:, :] == 128)
    assert torch.all(out["image"][:, :, 797:] == 128)
    assert torch.all(out["sem_seg"][644:, :] == 254)
    assert torch.all(out["sem_seg"][:, 797:] == 254)
    assert np.array_equal(out["image"][:, :644, :797].permute(1, 2, 0).numpy(), image)
    expected = remap(label, {k: k for k in range(5)}, 254)
    assert np.array_equal(out["sem_seg"][:644, :797].numpy(), expected)


def test_graph_sampling(dubai_dict, tmp_path):
    graph = tmp_path / "graph.jsonl"
    lines = [
        f'("relationship"<|>"{c}"<|>"{n}"<|>"2")'
        for c in DUBAI_CLASSES
        for n in ("sand", "ship")
    ]
    lines.append('("relationship"<|>"building"<|>"cloud"<|>"2")')
    graph.write_text("\n".join(lines) + "\n")
    mapper = make_mapper([], graph_files={"dubai_test": str(graph)}, text_batch=50)
    out = mapper.map(dubai_dict)
    assert out["texts"][:5] == DUBAI_CLASSES
    assert sorted(out["texts"][5:]) == ["sand", "ship"]
    assert out["graph_sampled"] is True
    assert int(out["sem_seg"][out["sem_seg"] != 255].max()) < 5


def test_label_value_past_ann_list(dubai_dict):
    dubai_dict["class_names"] = DUBAI_CLASSES[:3]
    with pytest.raises(ValueError, match=r"label values \[3, 4\]") as info:
        make_mapper([]).map(dubai_dict)
    assert f"{STEM}.png" in str(info.value)


def test_size_mismatch_names_both_files(dubai_dict, samples_dir):
    other = samples_dir / "dubai_aerial" / "labels" / "dubai_t2_001.png"
    dubai_dict["sem_seg_file_name"] = str(other)
    with pytest.raises(ValueError, match="797 x 644") as info:
        make_mapper([]).map(dubai_dict)
    message = str(info.value)
    assert f"{STEM}.jpg" in message
    assert "dubai_t2_001.png" in message
    assert "509 x 544" in message


def test_unknown_label_format(dubai_dict):
    dubai_dict["label_format"] = "polygons"
    with pytest.raises(ValueError, match="polygons"):
        make_mapper([]).map(dubai_dict)


def test_binary_masks_first_listed_wins(tmp_path):
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "image.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    first = np.array([[1, 1, 255], [255, 255, 255]], np.uint8)
    second = np.array([[255, 1, 1], [255, 255, 255]], np.uint8)
    Image.fromarray(first, mode="L").save(masks / "0.png")
    Image.fromarray(second, mode="L").save(masks / "sand_dune.png")
    dataset_dict = {
        "file_name": str(tmp_path / "image.png"),
        "sem_seg_file_name": str(masks),
        "label_format": "binary_masks",
        "class_names": ["road", "sand dune"],
        "dataset_name": "masks",
    }
    out = make_mapper([], vocabularies={}).map(dataset_dict)
    assert out["sem_seg"].tolist() == [[0, 0, 1], [255, 255, 255]]
    assert out["texts"] == ["road", "sand dune"]

    dataset_dict["class_names"] = ["road", "sand dune", "lake"]
    with pytest.raises(FileNotFoundError, match="lake"):
        make_mapper([]).map(dataset_dict)


def test_bad_samples_skipped_then_raised(dubai_dict):
    bad = dict(dubai_dict, file_name="/nonexistent/image.png")
    mapper = make_mapper([], max_bad_sample_fraction=0.1)
    assert mapper(bad) is None
    for _ in range(18):
        assert mapper(dubai_dict) is not None
    with pytest.raises(RuntimeError, match="MAX_BAD_SAMPLE_FRACTION"):
        for _ in range(3):
            mapper(bad)


def test_from_config_uses_dataset_vocabulary(samples_dir, tmp_path, dataset_name):
    folder = tmp_path / "skysa"
    (folder / "img_dir").mkdir(parents=True)
    (folder / "ann_dir").mkdir()
    root = samples_dir / "dubai_aerial"
    (folder / "img_dir" / "x.jpg").write_bytes((root / "images" / f"{STEM}.jpg").read_bytes())
    (folder / "ann_dir" / "x.png").write_bytes((root / "labels" / f"{STEM}.png").read_bytes())
    ann_list = ", ".join(f'{{"category_name": "{c}"}}' for c in DUBAI_CLASSES)
    line = (
        f'{{"flickr_url": "img_dir/x.jpg", "segmentation": "ann_dir/x.png", '
        f'"ann_list": [{ann_list}]}}'
    )
    (folder / "skysa_dataset.jsonl").write_text(line + "\n")
    register_skysa_folder(dataset_name, folder)

    cfg = training_cfg()
    cfg.DATASETS.TRAIN = (dataset_name,)
    mapper = MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, True)
    assert mapper.graph_files == {}
    assert mapper.vocabularies == {dataset_name: sorted(DUBAI_CLASSES)}
    assert mapper.text_batch == 8
    out = mapper.map(DatasetCatalog.get(dataset_name)[0])
    assert out["image"].shape == (3, 320, 320)
    assert out["texts"] == DUBAI_CLASSES

    cfg.DATASETS.SKYSA.GRAPH_FILE = str(tmp_path / "missing_graph.jsonl")
    with pytest.raises(FileNotFoundError, match="DATASETS.SKYSA.GRAPH_FILE"):
        SkySASemanticDatasetMapper(cfg, True)


def test_training_mapper_rejects_test_mode():
    with pytest.raises(ValueError, match="skysense_test"):
        SkySASemanticDatasetMapper(False, augmentations=[])
    assert AUG_IGNORE == 255


def test_test_mapper_resizes_and_names(samples_dir, dataset_name):
    register_folder_dataset(dataset_name, samples_dir / "dubai_aerial")
    MetadataCatalog.get(dataset_name).synonyms = [[f"{c} area"] for c in DUBAI_CLASSES]
    dataset_dict = DatasetCatalog.get(dataset_name)[1]
    cfg = training_cfg(**{"INPUT.MIN_SIZE_TEST": 384, "INPUT.MAX_SIZE_TEST": 1333})
    mapper = MAPPER_REGISTRY.get("skysense_test")(cfg, False)
    out = mapper(dataset_dict)
    assert out["image"].dtype == torch.uint8
    assert out["image"].shape == (3, 384, 475)
    assert (out["height"], out["width"]) == (644, 797)
    assert out["texts"] == DUBAI_CLASSES
    assert out["synonyms"][0] == ["building area"]
    assert out["sem_seg_file_name"] == dataset_dict["sem_seg_file_name"]
    assert out["file_name"] == dataset_dict["file_name"]


def test_test_mapper_without_resize(dubai_dict):
    mapper = SkySenseTestDatasetMapper(min_size=0, max_size=1333)
    out = mapper(dubai_dict)
    assert out["image"].shape == (3, 644, 797)
    expected = read_image(dubai_dict["file_name"])
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), expected)
    assert out["texts"] == DUBAI_CLASSES
    assert "synonyms" not in out


def test_test_mapper_needs_class_names(dubai_dict):
    del dubai_dict["class_names"]
    with pytest.raises(KeyError, match="class names"):
        SkySenseTestDatasetMapper(min_size=0, max_size=1333)(dubai_dict)
    with pytest.raises(ValueError, match="skysa_semantic"):
        SkySenseTestDatasetMapper(True, min_size=0, max_size=1333)
