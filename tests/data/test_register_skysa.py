"""Tests of the Sky-SA dataset registration."""

import json
import logging
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from skysense_o.data.datasets.register_skysa import (
    LazyMetadata,
    load_skysa_jsonl,
    register_dataset,
    register_skysa_folder,
    unregister_dataset,
)


@pytest.fixture
def dataset_name():
    """A fresh dataset name, removed from both catalogs after the test."""
    name = f"test_skysa_{uuid.uuid4().hex[:8]}"
    yield name
    unregister_dataset(name)


def write_record_files(folder, stem, classes):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(folder / "img_dir" / f"{stem}.png")
    label = np.full((4, 6), 255, np.uint8)
    label[:, : len(classes)] = np.arange(len(classes))
    Image.fromarray(label, mode="L").save(folder / "ann_dir" / f"{stem}.png")
    return {
        "flickr_url": f"img_dir/{stem}.png",
        "segmentation": f"ann_dir/{stem}.png",
        "ann_list": [{"category_name": c} for c in classes],
    }


@pytest.fixture
def skysa_folder(tmp_path):
    folder = tmp_path / "Sky-SA"
    (folder / "img_dir").mkdir(parents=True)
    (folder / "ann_dir").mkdir()
    records = [
        write_record_files(folder, "a", ["road", "building"]),
        {"flickr_url": "img_dir/empty.png", "segmentation": "ann_dir/empty.png", "ann_list": []},
        write_record_files(folder, "b", ["water", "road", "solar panel"]),
        {
            "flickr_url": "img_dir/masks.png",
            "segmentation": "ann_dir/masks_of_c",
            "ann_list": [{"category_name": "tree"}],
        },
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(2, "")
    (folder / "skysa_dataset.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_load_dicts(skysa_folder, dataset_name, caplog):
    register_skysa_folder(dataset_name, skysa_folder)
    with caplog.at_level(logging.WARNING):
        dicts = DatasetCatalog.get(dataset_name)
    assert len(dicts) == 3
    assert "skipped 1 images with an empty ann_list" in caplog.text
    first = dicts[0]
    assert first["file_name"] == str(skysa_folder.resolve() / "img_dir" / "a.png")
    assert first["sem_seg_file_name"] == str(skysa_folder.resolve() / "ann_dir" / "a.png")
    assert first["label_format"] == "index"
    assert first["class_names"] == ["road", "building"]
    assert first["dataset_name"] == dataset_name
    assert dicts[2]["label_format"] == "binary_masks"
    assert dicts[2]["sem_seg_file_name"].endswith("ann_dir/masks_of_c")


def test_metadata(skysa_folder, dataset_name):
    register_skysa_folder(dataset_name, skysa_folder)
    metadata = MetadataCatalog.get(dataset_name)
    assert metadata.ignore_label == 255
    assert metadata.evaluator_type == "skysense_sem_seg"
    assert metadata.graph_file == ""
    assert metadata.vocabulary == ["building", "road", "solar panel", "tree", "water"]
    assert "_lazy_loaders" not in metadata.as_dict()


def test_graph_file_metadata(skysa_folder, dataset_name):
    graph = skysa_folder / "skysa_graph.jsonl"
    graph.write_text('("relationship"<|>"road"<|>"water"<|>"1")\n')
    register_skysa_folder(dataset_name, skysa_folder)
    assert MetadataCatalog.get(dataset_name).graph_file == str(graph.resolve())


def test_registration_reads_nothing(tmp_path, dataset_name):
    register_skysa_folder(dataset_name, tmp_path / "not_yet")
    assert MetadataCatalog.get(dataset_name).ignore_label == 255
    with pytest.raises(FileNotFoundError, match="not_yet"):
        DatasetCatalog.get(dataset_name)
    with pytest.raises(FileNotFoundError, match="not_yet"):
        MetadataCatalog.get(dataset_name).vocabulary


def test_absolute_paths_kept(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    record = {"flickr_url": "/data/x.tif", "segmentation": "/data/x.png", "ann_list": ["sand"]}
    jsonl.write_text(json.dumps(record) + "\n")
    dicts = load_skysa_jsonl(jsonl, dataset_name="d")
    assert dicts[0]["file_name"] == "/data/x.tif"
    assert dicts[0]["class_names"] == ["sand"]


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "line 2: invalid JSON"),
        ('{"flickr_url": "a.png", "ann_list": []}', "line 2: missing key 'segmentation'"),
        (
            '{"flickr_url": "https://x.org/a.png", "segmentation": "a.png", "ann_list": ["a"]}',
            "line 2: 'flickr_url' is a URL",
        ),
        (
            '{"flickr_url": "a.png", "segmentation": "a.png", "ann_list": [{"name": "a"}]}',
            "line 2: each 'ann_list' entry needs",
        ),
    ],
)
def test_bad_lines_name_line(tmp_path, line, message):
    good = {"flickr_url": "a.png", "segmentation": "a.png", "ann_list": ["a"]}
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_skysa_jsonl(jsonl, dataset_name="bad")


def test_skysa_train_from_env(tmp_path, monkeypatch, skysa_folder):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(skysa_folder.parent))
    dicts = DatasetCatalog.get("skysa_train")
    assert [d["class_names"][0] for d in dicts] == ["road", "water", "tree"]
    assert dicts[0]["file_name"] == str(skysa_folder / "img_dir" / "a.png")


def test_skysa_train_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS") as info:
        DatasetCatalog.get("skysa_train")
    assert str(tmp_path / "elsewhere" / "Sky-SA" / "skysa_dataset.jsonl") in str(info.value)
    with pytest.raises(FileNotFoundError, match="skysa_test.jsonl"):
        DatasetCatalog.get("skysa_test")


def test_duplicate_name_rejected(skysa_folder, dataset_name):
    register_skysa_folder(dataset_name, skysa_folder)
    with pytest.raises(ValueError, match=dataset_name):
        register_skysa_folder(dataset_name, skysa_folder)


def test_lazy_metadata_retries_failed_loader(dataset_name):
    calls = []

    def loader():
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError("not ready")
        return {"stuff_classes": ["a", "b"], "ignore_label": 255}

    register_dataset(dataset_name, list, values={"x": 1}, lazy={"stuff_classes": loader})
    metadata = MetadataCatalog.get(dataset_name)
    assert isinstance(metadata, LazyMetadata)
    with pytest.raises(FileNotFoundError):
        metadata.stuff_classes
    assert metadata.stuff_classes == ["a", "b"]
    assert metadata.ignore_label == 255
    assert metadata.get("stuff_colors", "none") == "none"
    assert len(calls) == 2
