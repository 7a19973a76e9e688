"""Tests of tools/prepare_quickstart.py and the quick-start datasets it feeds."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from skysense_o.data.graph import load_graph
from skysense_o.utils.image_io import read_label

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"
QUICKSTART_GRAPH = TOOLS_DIR.parent / "datasets" / "graphs" / "quickstart_graph.jsonl"

VAL_DUBAI = "skysense_quickstart_val_dubai_aerial"
VAL_LOVEDA = "skysense_quickstart_val_loveda"
TRAIN = "skysense_quickstart_train"


@pytest.fixture(scope="module")
def tool():
    # The tools are scripts, imported here as top-level modules as when run from tools/.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS_DIR))
        return importlib.import_module("prepare_quickstart")


@pytest.fixture
def datasets_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    return root


def test_prepare_and_load(tool, samples_dir, datasets_root):
    assert tool.prepare_quickstart(samples_dir) is True
    out = datasets_root / "skysense_quickstart"
    state = json.loads((out / "quickstart.json").read_text())
    assert state["validation_stems"] == {
        "dubai_aerial": ["dubai_t4_006", "dubai_t1_009"],
        "loveda": ["loveda_1"],
    }

    train = DatasetCatalog.get(TRAIN)
    assert len(train) == 11
    stems = {d["file_name"].rsplit("/", 1)[1].split(".")[0] for d in train}
    assert not stems & {"dubai_t4_006", "dubai_t1_009", "loveda_1"}
    assert "potsdam_2_10_0_0_512_512" in stems
    assert all(d["dataset_name"] == TRAIN for d in train)

    val_dubai = DatasetCatalog.get(VAL_DUBAI)
    assert [d["file_name"].rsplit("/", 1)[1] for d in val_dubai] == [
        "dubai_t1_009.jpg",
        "dubai_t4_006.jpg",
    ]
    dubai_classes = json.loads((samples_dir / "dubai_aerial" / "classes.json").read_text())
    assert MetadataCatalog.get(VAL_DUBAI).stuff_classes == dubai_classes["classes"]
    assert MetadataCatalog.get(VAL_DUBAI).ignore_label == 255
    assert MetadataCatalog.get(VAL_DUBAI).stuff_colors == dubai_classes["palette"]

    val_loveda = DatasetCatalog.get(VAL_LOVEDA)
    assert len(val_loveda) == 1
    assert MetadataCatalog.get(VAL_LOVEDA).stuff_classes[-1] == "agriculture"
    original = read_label(samples_dir / "loveda" / "labels" / "loveda_1.png")
    assert (read_label(val_loveda[0]["sem_seg_file_name"]) == original).all()


def test_quickstart_graph_covers_sample_classes(samples_dir):
    graph = load_graph(QUICKSTART_GRAPH)
    hyper = (1, 3, 9, 10)
    # Every class of the three sample datasets is a node.
    for dataset in ("dubai_aerial", "loveda", "isprs_potsdam"):
        classes = json.loads((samples_dir / dataset / "classes.json").read_text())["classes"]
        assert all(name in graph for name in classes), dataset
    # Names for the same ground cover in different datasets are never each other's negatives.
    assert graph.positives("road", hyper) == {"impervious surfaces"}
    assert graph.positives("vegetation", hyper) == {"low vegetation", "tree", "forest"}
    assert "water" in graph.negatives("building", hyper)


def test_second_run_is_noop(tool, samples_dir, datasets_root, capsys):
    assert tool.prepare_quickstart(samples_dir) is True
    marker = datasets_root / "skysense_quickstart" / "train" / "skysa_dataset.jsonl"
    mtime = marker.stat().st_mtime_ns
    assert tool.main([str(samples_dir)]) == 0
    assert "Up to date" in capsys.readouterr().out
    assert marker.stat().st_mtime_ns == mtime


def test_rebuilt_when_output_damaged(tool, samples_dir, datasets_root):
    tool.prepare_quickstart(samples_dir)
    label = datasets_root / "skysense_quickstart" / "val_loveda" / "labels" / "loveda_1.png"
    label.unlink()
    assert tool.prepare_quickstart(samples_dir) is True
    assert label.is_file()


def test_rebuilt_when_samples_change(tool, samples_dir, datasets_root, tmp_path):
    copy = tmp_path / "samples"
    shutil.copytree(samples_dir, copy, ignore=shutil.ignore_patterns("demo"))
    assert tool.prepare_quickstart(copy) is True
    assert tool.prepare_quickstart(copy) is False

    classes_path = copy / "isprs_potsdam" / "classes.json"
    classes = json.loads(classes_path.read_text())
    classes["classes"][4] = "automobile"
    classes_path.chmod(0o644)
    classes_path.write_text(json.dumps(classes))
    assert tool.prepare_quickstart(copy) is True
    jsonl = datasets_root / "skysense_quickstart" / "train" / "skysa_dataset.jsonl"
    assert "automobile" in jsonl.read_text()


def test_choose_validation_stems_rule(tool):
    def sample(stem, fractions):
        return {"image": f"x/{stem}.png", "label_fractions": fractions}

    manifest = {
        "datasets": {
            "d": {
                "samples": [
                    sample("few", {"0": 0.5, "1": 0.5}),
                    sample("all_rare", {"0": 0.9, "1": 0.05, "2": 0.01, "255": 0.04}),
                    sample("all_even", {"0": 0.4, "1": 0.3, "2": 0.3}),
                    sample("all_even_b", {"0": 0.4, "1": 0.3, "2": 0.3, "255": 0.0}),
                ]
            }
        }
    }
    assert tool.choose_validation_stems(manifest, "d", 2, 255) == ["all_even", "all_even_b"]
    assert tool.choose_validation_stems(manifest, "d", 3, 255)[2] == "all_rare"
    with pytest.raises(ValueError, match="none to train on"):
        tool.choose_validation_stems(manifest, "d", 4, 255)
    with pytest.raises(ValueError, match="'missing'"):
        tool.choose_validation_stems(manifest, "missing", 1, 255)


def test_default_samples_dir(tool, monkeypatch, tmp_path):
    monkeypatch.setenv("SKYSENSE_SAMPLES", str(tmp_path))
    assert tool.default_samples_dir() == tmp_path
    monkeypatch.delenv("SKYSENSE_SAMPLES")
    assert tool.default_samples_dir().parts[-3:] == ("shared", "data", "rs_samples")


def test_missing_samples(tool, tmp_path, datasets_root, capsys):
    assert tool.main([str(tmp_path / "nowhere")]) == 1
    assert "manifest.json" in capsys.readouterr().err
