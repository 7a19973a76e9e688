"""Benchmark class lists and their lazy registration in Detectron2's catalogs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from skysense_o.data.datasets import register_benchmarks as rb

CLASS_LISTS = Path(__file__).resolve().parents[2] / "datasets" / "class_lists"

# benchmark: (number of classes, {label value: class name}, release name of label value 0)
EXPECTED = {
    "isaid": (16, {0: "background", 1: "ship", 8: "large vehicle", 15: "harbor"}, "others"),
    "samrs_sota": (19, {0: "background", 1: "large vehicle", 18: "helipad"}, "others"),
    "samrs_sior": (21, {0: "background", 1: "airplane", 20: "windmill"}, "others"),
    "samrs_fast": (38, {0: "background", 1: "A220", 32: "tractor", 37: "warship"}, "others"),
    "potsdam": (6, {0: "impervious surfaces", 2: "low vegetation", 5: "clutter"}, "road"),
    "vaihingen": (6, {0: "impervious surfaces", 1: "building", 5: "clutter"}, "road"),
    "openearthmap": (9, {0: "background", 3: "developed space", 8: "building"}, "Others"),
    "loveda": (7, {0: "background", 1: "building", 6: "agriculture"}, "others"),
    "floodnet": (10, {0: "background", 1: "building flooded", 9: "grass"}, "Others"),
    "uavid": (8, {0: "clutter", 3: "static car", 7: "moving car"}, "Others"),
    "dubai_aerial": (5, {0: "building", 1: "land (unpaved area)", 4: "water"}, None),
}


@pytest.mark.parametrize("benchmark", sorted(EXPECTED))
def test_class_list_counts_and_names(benchmark):
    count, names, release_first = EXPECTED[benchmark]
    class_list = rb.load_class_list(benchmark)
    assert len(class_list.classes) == count
    for value, name in names.items():
        assert class_list.classes[value] == name
    assert class_list.ignore_label == 255
    if release_first is None:
        assert class_list.release_classes is None
    else:
        assert class_list.release_classes[0] == release_first
        assert len(class_list.release_classes) == count
    if class_list.colors is not None:
        assert len(class_list.colors) == count


@pytest.mark.parametrize("benchmark", sorted(EXPECTED))
def test_synonyms_refer_to_classes(benchmark):
    data = json.loads((CLASS_LISTS / f"{benchmark}.json").read_text())
    if data["synonyms_file"] is None:
        assert benchmark == "dubai_aerial"
        return
    synonyms = json.loads((CLASS_LISTS / data["synonyms_file"]).read_text())["synonyms"]
    assert list(synonyms) == data["classes"]
    for name, terms in synonyms.items():
        assert name not in terms
        assert len(set(terms)) == len(terms)


def test_release_others_is_the_catch_all_class():
    for benchmark in rb.RELEASE_BENCHMARKS:
        class_list = rb.load_class_list(benchmark)
        others = [i for i, n in enumerate(class_list.release_classes) if n.lower() == "others"]
        assert others == [class_list.background_class], benchmark
    potsdam = rb.load_class_list("potsdam").release_classes
    assert potsdam == ("road", "building", "grass", "tree", "car", "others")


def test_synonyms_follow_meaning_not_position():
    # The release's UAVid synonym file lists "Others" last while its class list has it first.
    uavid = rb.load_class_list("uavid")
    assert "residential house" in uavid.synonyms[uavid.classes.index("building")]
    assert "residential house" not in uavid.synonyms[uavid.classes.index("clutter")]
    isaid = rb.load_class_list("isaid")
    assert isaid.synonyms[isaid.classes.index("ship")] == ("the ship", "boat")


def test_release_lists_are_verbatim(class_lists_dir):
    raw = class_lists_dir / "raw" / "SkySense-O"
    for benchmark in rb.RELEASE_BENCHMARKS:
        release = json.loads((CLASS_LISTS / f"{benchmark}.json").read_text())["release"]
        assert release["ignore_label"] == 65535
        assert release["classes"] == json.loads((raw / release["source"]["path"]).read_text())


def test_sample_classes_agree(samples_dir):
    for benchmark, folder in (("dubai_aerial", "dubai_aerial"), ("loveda", "loveda"),
                              ("potsdam", "isprs_potsdam")):
        sample = json.loads((samples_dir / folder / "classes.json").read_text())
        assert rb.load_class_list(benchmark).classes == tuple(sample["classes"])


def test_expected_names_registered():
    registered = set(DatasetCatalog.list())
    for benchmark in EXPECTED:
        assert f"{benchmark}_test" in registered
        assert (f"{benchmark}_test_release" in registered) == (benchmark != "dubai_aerial")
    assert {"floodnet_val", "floodnet_val_release"} <= registered
    assert "isaid_val" not in registered


def test_evaluator_type_matches_evaluator():
    evaluation = pytest.importorskip("skysense_o.evaluation")
    assert rb.EVALUATOR_TYPE == evaluation.EVALUATOR_TYPE


def make_tree(root: Path, folder: str, stems, image_suffix=".png"):
    """A fake benchmark split: RGB images and matching label PNGs."""
    (root / folder / "img_dir" / "test").mkdir(parents=True)
    (root / folder / "ann_dir" / "test").mkdir(parents=True)
    for i, stem in enumerate(stems):
        image = np.full((6, 8, 3), 40 * i, dtype=np.uint8)
        Image.fromarray(image).save(root / folder / "img_dir" / "test" / f"{stem}{image_suffix}")
        label = np.full((6, 8), i, dtype=np.uint8)
        Image.fromarray(label).save(root / folder / "ann_dir" / "test" / f"{stem}.png")


def test_fake_tree_loads_with_metadata(tmp_path, monkeypatch):
    make_tree(tmp_path, "potsdam", ["top_2_13_0_0_512_512", "top_2_13_0_512_512_1024"])
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    dicts = DatasetCatalog.get("potsdam_test")

    assert [Path(d["file_name"]).name for d in dicts] == [
        "top_2_13_0_0_512_512.png", "top_2_13_0_512_512_1024.png"
    ]
    assert dicts[1]["sem_seg_file_name"] == str(
        tmp_path / "potsdam" / "ann_dir" / "test" / "top_2_13_0_512_512_1024.png"
    )
    meta = MetadataCatalog.get("potsdam_test")
    assert meta.stuff_classes == [
        "impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"
    ]
    assert meta.ignore_label == 255
    assert meta.evaluator_type == "skysense_sem_seg"
    assert meta.stuff_colors[1] == [0, 0, 255]
    assert meta.background_class == 5
    assert len(meta.synonyms) == 6
    assert "road" in meta.synonyms[0]
    assert meta.protocol == "default"
    assert Path(meta.class_list_file) == CLASS_LISTS / "potsdam.json"

    release = MetadataCatalog.get("potsdam_test_release")
    assert release.stuff_classes == ["road", "building", "grass", "tree", "car", "others"]
    assert release.ignore_label == 255
    assert release.synonyms == meta.synonyms
    assert DatasetCatalog.get("potsdam_test_release") == dicts


def test_other_image_suffixes_pair(tmp_path, monkeypatch):
    make_tree(tmp_path, "floodnet", ["6651", "7577"], image_suffix=".jpg")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    dicts = DatasetCatalog.get("floodnet_test")
    assert [Path(d["file_name"]).name for d in dicts] == ["6651.jpg", "7577.jpg"]
    assert MetadataCatalog.get("floodnet_test").get("stuff_colors") is None


def test_missing_tree_names_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get("isaid_test")
    message = str(info.value)
    assert str(tmp_path / "isaid" / "img_dir" / "val") in message
    assert "DETECTRON2_DATASETS" in message
    assert "'isaid'" in message
    assert "datasets/README.md" in message


def test_root_defaults_to_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="unset, default 'datasets'"):
        DatasetCatalog.get("uavid_test")


def test_unpaired_files_rejected(tmp_path, monkeypatch):
    make_tree(tmp_path, "loveda_raw", ["1", "2"])
    (tmp_path / "loveda_raw" / "img_dir" / "test" / "2.png").unlink()
    with pytest.raises(ValueError, match=r"1 files have no image .*e\.g\. 2"):
        folder = tmp_path / "loveda_raw"
        rb.pair_images_and_labels(folder / "img_dir" / "test", folder / "ann_dir" / "test")


def test_dubai_samples_load(samples_dir, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(samples_dir))
    dicts = DatasetCatalog.get("dubai_aerial_test")
    assert len(dicts) == 10
    values = np.unique(np.asarray(Image.open(dicts[0]["sem_seg_file_name"])))
    assert set(values.tolist()) <= set(range(5)) | {255}
    assert MetadataCatalog.get("dubai_aerial_test").stuff_classes[1] == "land (unpaved area)"


def test_missing_class_list_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        rb.load_class_list("potsdam", tmp_path / "nowhere")


def copy_class_list(tmp_path: Path, benchmark: str, **changes) -> Path:
    shutil.copytree(CLASS_LISTS, tmp_path / "lists")
    path = tmp_path / "lists" / f"{benchmark}.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "label_values":
            data["release"]["label_values"] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return tmp_path / "lists"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_classes": 7}, "'num_classes' is 7"),
        ({"classes": ["a", "a", "b", "c", "d", "e"]}, r"repeats \['a'\]"),
        ({"ignore_label": 3}, "'ignore_label'"),
        ({"background_class": 9}, "'background_class'"),
        ({"colors": [[0, 0, 0]]}, "'colors'"),
        ({"label_values": [0, 0, 1, 2, 3, 4]}, "label_values"),
    ],
)
def test_malformed_class_list_rejected(tmp_path, changes, message):
    folder = copy_class_list(tmp_path, "potsdam", **changes)
    with pytest.raises(ValueError, match=message) as info:
        rb.load_class_list("potsdam", folder)
    assert "potsdam.json" in str(info.value)


def test_synonyms_of_unknown_class_rejected(tmp_path):
    folder = copy_class_list(tmp_path, "loveda")
    path = folder / "synonyms" / "loveda.json"
    data = json.loads(path.read_text())
    data["synonyms"]["lake"] = ["pond"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\['lake'\]"):
        rb.load_class_list("loveda", folder)


def test_unknown_protocol_and_benchmark():
    with pytest.raises(ValueError, match="'mess'"):
        rb.benchmark_metadata("potsdam", "mess")
    with pytest.raises(ValueError, match="no 'release' list"):
        rb.benchmark_metadata("dubai_aerial", "release")
    with pytest.raises(KeyError, match="'gid'"):
        rb.register_benchmark("gid")
