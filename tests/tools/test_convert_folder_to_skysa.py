"""Tests of tools/convert_folder_to_skysa.py: exact round trip, options and bad input."""

import importlib
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from skysense_o.data.datasets.register_skysa import register_skysa_folder, unregister_dataset
from skysense_o.utils.image_io import read_label

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def tool():
    # The tools are scripts, imported here as top-level modules as when run from tools/.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS_DIR))
        return importlib.import_module("convert_folder_to_skysa")


@pytest.fixture
def dataset_name():
    name = f"test_convert_{uuid.uuid4().hex[:8]}"
    yield name
    unregister_dataset(name)


def names_per_pixel(label: np.ndarray, class_names, ignore: int) -> np.ndarray:
    """Replace each label value by its class name ("<ignore>" for ignored pixels)."""
    table = np.array(list(class_names) + ["<ignore>"], dtype=object)
    index = np.where(label == ignore, len(class_names), label)
    return table[index]


@pytest.mark.parametrize("dataset", ["dubai_aerial", "isprs_potsdam"])
def test_round_trip_exact(tool, samples_dir, tmp_path, dataset_name, dataset):
    source = samples_dir / dataset
    classes = json.loads((source / "classes.json").read_text())["classes"]
    plan = tool.plan_conversion(source)
    tool.write_skysa([plan], tmp_path / "out")
    register_skysa_folder(dataset_name, tmp_path / "out")
    dicts = DatasetCatalog.get(dataset_name)

    originals = sorted((source / "labels").glob("*.png"))
    assert len(dicts) == len(originals)
    for record, original_path in zip(dicts, originals):
        converted = read_label(record["sem_seg_file_name"])
        original = read_label(original_path)
        image_name = Path(record["file_name"]).name
        assert (source / "images" / image_name).is_file()
        assert Path(image_name).stem == original_path.stem
        assert np.array_equal(
            names_per_pixel(converted, record["class_names"], 255),
            names_per_pixel(original, classes, 255),
        )
        present = [classes[v] for v in np.unique(original) if v != 255]
        assert record["class_names"] == present


def test_images_copied_byte_for_byte(tool, samples_dir, tmp_path):
    source = samples_dir / "loveda"
    plan = tool.plan_conversion(source, include=["loveda_2"])
    records = tool.write_skysa([plan], tmp_path / "out")
    assert [r["flickr_url"] for r in records] == ["img_dir/loveda_2.png"]
    copied = (tmp_path / "out" / "img_dir" / "loveda_2.png").read_bytes()
    assert copied == (source / "images" / "loveda_2.png").read_bytes()
    names = [a["category_name"] for a in records[0]["ann_list"]]
    assert names == ["background", "water", "forest", "agriculture"]


def test_include_and_exclude(tool, samples_dir):
    source = samples_dir / "loveda"
    assert [i.stem for i in tool.plan_conversion(source, exclude=["loveda_1"]).images] == [
        "loveda_0",
        "loveda_2",
    ]
    included = tool.plan_conversion(source, include=["loveda_1"])
    assert [i.stem for i in included.images] == ["loveda_1"]
    with pytest.raises(ValueError, match="loveda_9"):
        tool.plan_conversion(source, exclude=["loveda_9"])
    with pytest.raises(ValueError, match="loveda_9"):
        tool.plan_conversion(source, include=["loveda_9"])


def test_dry_run_writes_nothing(tool, samples_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert tool.main([str(samples_dir / "loveda"), str(out), "--dry-run"]) == 0
    assert not out.exists()
    printed = capsys.readouterr().out
    assert "3 images to convert" in printed
    assert "agriculture: 3 images" in printed
    assert "Dry run" in printed


def test_graph_checked_and_copied(tool, samples_dir, tmp_path, capsys):
    graph = tmp_path / "graph.jsonl"
    graph.write_text('("relationship"<|>"road"<|>"water"<|>"2")\n')
    out = tmp_path / "out"
    assert tool.main([str(samples_dir / "loveda"), str(out), "--graph", str(graph)]) == 0
    assert (out / "skysa_graph.jsonl").read_bytes() == graph.read_bytes()
    printed = capsys.readouterr().out
    assert "road: 2 images, in the graph" in printed
    assert "forest: 2 images, not in the graph" in printed


def test_invalid_graph_rejected(tool, samples_dir, tmp_path, capsys):
    graph = tmp_path / "bad.jsonl"
    graph.write_text("nothing useful\n")
    out = tmp_path / "out"
    assert tool.main([str(samples_dir / "loveda"), str(out), "--graph", str(graph)]) == 1
    assert "bad.jsonl" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_needs_overwrite(tool, samples_dir, tmp_path, capsys):
    out = tmp_path / "out"
    source = str(samples_dir / "isprs_potsdam")
    assert tool.main([source, str(out)]) == 0
    assert tool.main([source, str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert tool.main([source, str(out), "--overwrite"]) == 0
    assert len((out / "skysa_dataset.jsonl").read_text().splitlines()) == 1


@pytest.fixture
def tiny_folder(tmp_path):
    root = tmp_path / "tiny"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"], "ignore_index": 7}))
    labels = {
        "full": np.array([[2, 7], [0, 2]], np.uint8),
        "empty": np.full((2, 2), 7, np.uint8),
    }
    for stem, label in labels.items():
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"{stem}.png")
    return root


def test_ignore_remapped_and_empty_left_out(tool, tiny_folder, tmp_path):
    plan = tool.plan_conversion(tiny_folder)
    assert plan.empty_stems == ["empty"]
    assert "1 without any class pixel left out ['empty']" in tool.summarize([plan])
    records = tool.write_skysa([plan], tmp_path / "out")
    assert [a["category_name"] for a in records[0]["ann_list"]] == ["a", "c"]
    label = read_label(tmp_path / "out" / "ann_dir" / "full.png")
    assert label.tolist() == [[1, 255], [0, 1]]


def test_invalid_label_value(tool, tiny_folder):
    Image.fromarray(np.array([[5, 0], [0, 0]], np.uint8), mode="L").save(
        tiny_folder / "labels" / "full.png"
    )
    with pytest.raises(ValueError, match=r"full.png contains values \[5\]"):
        tool.plan_conversion(tiny_folder)


def test_size_mismatch(tool, tiny_folder):
    Image.fromarray(np.zeros((3, 2), np.uint8), mode="L").save(tiny_folder / "labels" / "full.png")
    with pytest.raises(ValueError, match="2 x 2 but its label"):
        tool.plan_conversion(tiny_folder)


def test_name_collision_between_sources(tool, tiny_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy)
    with pytest.raises(ValueError, match="share the output name"):
        plans = [tool.plan_conversion(tiny_folder), tool.plan_conversion(copy)]
        tool.write_skysa(plans, tmp_path / "out")
