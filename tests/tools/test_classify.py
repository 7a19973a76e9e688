"""Tests of tools/classify.py: zero-shot classification and its accuracy on class folders."""

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skysense_o.release import build_model_for_inference
from tests.test_release import build_tiny_model, release_cfg

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO_ROOT / "tools"
CLASSES = ["bare land", "forest", "river"]


@pytest.fixture(scope="module")
def tool():
    # The tools are scripts, imported here as top-level modules as when run from tools/.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS_DIR))
        return importlib.import_module("classify")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random release-layout model saved as weights, and its config file."""
    folder = tmp_path_factory.mktemp("classify_model")
    weights = folder / "tiny.pth"
    torch.save({"model": build_tiny_model(0).state_dict()}, weights)
    config = folder / "tiny.yaml"
    config.write_text(release_cfg().dump())
    return config, weights


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """Two small images per class, in one subfolder per class (folder names use "_")."""
    root = tmp_path_factory.mktemp("scenes")
    generator = np.random.default_rng(0)
    for index, name in enumerate(CLASSES):
        folder = root / name.replace(" ", "_")
        folder.mkdir()
        for number in range(2):
            pixels = generator.integers(0, 256, (40 + 8 * index, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{number}.png")
    return root


def direct_scores(tiny_setup, tool, paths, class_names):
    config, weights = tiny_setup
    cfg = release_cfg()
    model = build_model_for_inference(cfg, weights, "cpu", low_memory=True)
    classifier = tool.ZeroShotClassifier(model, image_size=cfg.MODEL.SKYSENSE_O.BACKBONE.IMAGE_SIZE)
    return classifier.scores(paths, class_names)


def run_tool(tool, capsys, *argv):
    code = tool.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_folder_prints_accuracy(tool, tiny_setup, class_folder, capsys):
    config, weights = tiny_setup
    code, out, _ = run_tool(tool, capsys, "--config", str(config), "--weights", str(weights),
                            "--eval-folder", str(class_folder), "--top-k", "2",
                            "--device", "cpu")

    class_names, paths, labels = tool.read_class_folders(class_folder)
    scores = direct_scores(tiny_setup, tool, paths, class_names)
    predicted = scores.argmax(dim=1)
    expected_top1 = 100 * float((predicted == torch.tensor(labels)).float().mean())
    top2 = scores.topk(2, dim=1).indices
    expected_top2 = 100 * float((top2 == torch.tensor(labels)[:, None]).any(dim=1).float().mean())
    assert code == 0
    assert class_names == CLASSES
    assert f"top-1 accuracy: {expected_top1:.2f}% (6 images)" in out
    assert f"top-2 accuracy: {expected_top2:.2f}%" in out
    for name in CLASSES:
        assert re.search(rf"^{name}\s+\d+\.\d\d$", out, flags=re.MULTILINE), name


def test_input_mode_orders_classes_by_score(tool, tiny_setup, class_folder, capsys):
    config, weights = tiny_setup
    images = sorted(class_folder.rglob("*.png"))[:3]
    code, out, _ = run_tool(tool, capsys, "--config", str(config), "--weights", str(weights),
                            "--classes", ",".join(CLASSES), "--input", *map(str, images),
                            "--top-k", "3", "--device", "cpu")

    scores = direct_scores(tiny_setup, tool, images, CLASSES)
    blocks = out.strip().split("\n")
    assert code == 0
    assert len(blocks) == 4 * len(images)
    for index, path in enumerate(images):
        block = blocks[4 * index: 4 * index + 4]
        assert block[0] == str(path)
        printed = [re.match(r"\s+\d\. (.+)  (-?\d\.\d{4})$", line).groups() for line in block[1:]]
        printed_scores = [float(value) for _, value in printed]
        order = scores[index].argsort(descending=True).tolist()
        assert [name for name, _ in printed] == [CLASSES[i] for i in order]
        assert printed_scores == sorted(printed_scores, reverse=True)
        assert printed_scores[0] == pytest.approx(float(scores[index].max()), abs=1e-4)


def test_open_clip_backbone_classifies_folder(tool, class_folder, capsys):
    config = REPO_ROOT / "configs" / "quickstart.yaml"
    code, out, _ = run_tool(tool, capsys, "--config", str(config), "--input", str(class_folder),
                            "--classes", ",".join(CLASSES), "--top-k", "1", "--device", "cpu")

    assert code == 0
    assert len(re.findall(r"^\s+1\. ", out, flags=re.MULTILINE)) == 6


def test_top_k_above_class_count_is_rejected(tool, tiny_setup, class_folder, capsys):
    config, weights = tiny_setup
    code, _, err = run_tool(tool, capsys, "--config", str(config), "--weights", str(weights),
                            "--eval-folder", str(class_folder), "--top-k", "4")

    assert code == 2
    assert "--top-k" in err
    assert "3 classes, got 4" in err


def test_class_count_must_match_folders(tool, class_folder):
    with pytest.raises(ValueError, match="2 names but .* has 3 class subfolders"):
        tool.read_class_folders(class_folder, ["a", "b"])


def test_missing_inputs_are_reported(tool, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        tool.collect_images([str(tmp_path / "nowhere.png")])
    with pytest.raises(FileNotFoundError, match="no images"):
        tool.collect_images([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="not found"):
        tool.read_class_folders(tmp_path / "absent")


def test_parse_classes_formats(tool, tmp_path):
    text_file = tmp_path / "names.txt"
    text_file.write_text("airport\n\n beach \n")
    list_file = tmp_path / "names.json"
    list_file.write_text(json.dumps(["airport", "beach"]))
    object_file = tmp_path / "benchmark.json"
    object_file.write_text(json.dumps({"classes": ["airport", "beach"], "num_classes": 2}))

    assert tool.parse_classes("airport, beach,") == ["airport", "beach"]
    assert tool.parse_classes(str(text_file)) == ["airport", "beach"]
    assert tool.parse_classes(str(list_file)) == ["airport", "beach"]
    assert tool.parse_classes(str(object_file)) == ["airport", "beach"]


@pytest.mark.parametrize("value, error, message", [
    ("airport,airport", ValueError, "repeated"),
    (" , ", ValueError, "no class names"),
    ("absent.txt", FileNotFoundError, "absent.txt"),
])
def test_parse_classes_rejects_bad_input(tool, value, error, message):
    with pytest.raises(error, match=message):
        tool.parse_classes(value)


def test_accuracy_counts_hits(tool):
    scores = torch.tensor([[0.9, 0.5, 0.1],
                           [0.2, 0.1, 0.8],
                           [0.1, 0.7, 0.6]])
    result = tool.accuracy(scores, [0, 1, 2], ["a", "b", "c"], k=2)

    assert result.top1 == pytest.approx(1 / 3)
    assert result.topk == pytest.approx(2 / 3)
    assert result.per_class == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert result.count == 3
