"""Tests of folder datasets (images/, labels/, classes.json) and the quick-start names."""

import json
import shutil
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from skysense_o.data.datasets.register_folder import (
    QUICKSTART_TRAIN_NAME,
    QUICKSTART_VAL_SETS,
    list_folder_items,
    read_classes_json,
    register_folder_dataset,
)
from skysense_o.data.datasets.register_skysa import unregister_dataset


@pytest.fixture
def dataset_name():
    name = f"test_folder_{uuid.uuid4().hex[:8]}"
    yield name
    unregister_dataset(name)


@pytest.fixture
def small_folder(tmp_path):
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.zeros((3, 3), np.uint8), mode="L").save(root / "labels" / f"{stem}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["x", "y"], "ignore_index": 9}))
    return root


def test_samples_folder(samples_dir, dataset_name):
    root = samples_dir / "dubai_aerial"
    register_folder_dataset(dataset_name, root)
    dicts = DatasetCatalog.get(dataset_name)
    classes = json.loads((root / "classes.json").read_text())["classes"]
    assert len(dicts) == 10
    assert dicts[0]["file_name"] == str(root.resolve() / "images" / "dubai_t1_005.jpg")
    assert dicts[0]["sem_seg_file_name"] == str(root.resolve() / "labels" / "dubai_t1_005.png")
    assert dicts[0]["class_names"] == classes
    assert dicts[0]["label_format"] == "index"
    assert dicts[0]["ignore_label"] == 255

    metadata = MetadataCatalog.get(dataset_name)
    assert metadata.stuff_classes == classes
    assert metadata.stuff_colors[0] == [60, 16, 152]
    assert metadata.ignore_label == 255
    assert metadata.evaluator_type == "skysense_sem_seg"


def test_stems_and_split_file(small_folder, dataset_name):
    (small_folder / "val.txt").write_text("# held out\na\n\nc\n")
    register_folder_dataset(dataset_name, small_folder, split_file="val.txt")
    assert [d["file_name"][-5:] for d in DatasetCatalog.get(dataset_name)] == ["a.png", "c.png"]
    items = list_folder_items(small_folder, stems=["b"])
    assert [stem for stem, _, _ in items] == ["b"]


def test_ignore_index_and_no_palette(small_folder, dataset_name):
    register_folder_dataset(dataset_name, small_folder)
    metadata = MetadataCatalog.get(dataset_name)
    assert metadata.ignore_label == 9
    assert metadata.get("stuff_colors") is None
    assert DatasetCatalog.get(dataset_name)[0]["ignore_label"] == 9


def test_missing_classes_json(small_folder, dataset_name):
    (small_folder / "classes.json").unlink()
    with pytest.raises(FileNotFoundError, match="classes.json"):
        register_folder_dataset(dataset_name, small_folder)


@pytest.mark.parametrize(
    "content,message",
    [
        ({"classes": []}, "'classes' must be a non-empty list"),
        ({"classes": ["a", 3]}, "'classes' must be a non-empty list"),
        ({"classes": ["a", "b"], "ignore_index": 1}, "'ignore_index' must be an integer"),
        ({"classes": ["a"], "palette": [[0, 0]]}, "'palette' must list"),
    ],
)
def test_invalid_classes_json(small_folder, content, message):
    (small_folder / "classes.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_classes_json(small_folder)


def test_image_without_label(small_folder):
    (small_folder / "labels" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"images without a label.*\['b'\]"):
        list_folder_items(small_folder)


def test_label_without_image(small_folder):
    (small_folder / "images" / "c.png").unlink()
    with pytest.raises(ValueError, match=r"labels without an image.*\['c'\]"):
        list_folder_items(small_folder)


def test_unknown_stem(small_folder):
    with pytest.raises(ValueError, match=r"\['zz'\]"):
        list_folder_items(small_folder, stems=["a", "zz"])


def test_duplicate_stem(small_folder):
    shutil.copyfile(small_folder / "images" / "a.png", small_folder / "images" / "a.jpg")
    with pytest.raises(ValueError, match="share the stem 'a'"):
        list_folder_items(small_folder)


def test_quickstart_missing_tells_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    for name in [QUICKSTART_TRAIN_NAME, *QUICKSTART_VAL_SETS]:
        with pytest.raises(FileNotFoundError, match="tools/prepare_quickstart.py"):
            DatasetCatalog.get(name)
