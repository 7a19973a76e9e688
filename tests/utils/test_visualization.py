"""Tests of class colours, colourised label maps, overlays and legends."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skysense_o.utils import visualization
from skysense_o.utils.visualization import (
    add_legend,
    class_color,
    class_palette,
    colorize,
    draw_segmentation,
    legend_entries,
    normalize_class_name,
    overlay,
)

NAMES = ["building", "road", "water", "solar panel"]
LABELS = np.array(
    [
        [0, 0, 1, 255],
        [0, 1, 1, 255],
        [3, 3, 1, 1],
    ]
)


def colour_pixels(image: np.ndarray, color) -> int:
    return int(np.all(image == np.asarray(color, dtype=np.uint8), axis=-1).sum())


def test_class_color_fixed_value_for_building():
    assert class_color("building") == (220, 20, 60)
    assert class_color("  Building ") == (220, 20, 60)
    assert class_color("low_vegetation") == class_color("low vegetation")
    assert class_color("land (unpaved area)") == class_color("land")


def test_normalize_class_name():
    assert normalize_class_name("  Low_Vegetation--Area ") == "low vegetation area"


def test_class_color_same_in_subprocess():
    names = ["building", "solar panel", "terraced field", "the helipad"]
    # The module is loaded from its file, which skips the package's torch and Detectron2 imports.
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('visualization', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps([module.class_color(n) for n in json.loads(sys.argv[2])]))\n"
    )
    # A different hash seed makes hash() differ, which class_color must not depend on.
    environment = dict(os.environ, PYTHONHASHSEED="12345")
    completed = subprocess.run(
        [sys.executable, "-c", script, visualization.__file__, json.dumps(names)],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
        timeout=120,
    )
    in_subprocess = [tuple(color) for color in json.loads(completed.stdout)]
    assert in_subprocess == [class_color(name) for name in names]


def test_hashed_color_is_fixed():
    # Pinned so that a change of the hashing or the palette shows up as a failure.
    assert class_color("solar panel") == (14, 140, 46)
    assert class_color("terraced field") == (140, 14, 77)
    assert class_color("solar panel") == class_color("Solar_Panel")
    assert class_color("solar panel") != class_color("solar panels")
    assert all(0 <= channel <= 255 for channel in class_color("solar panel"))


@pytest.mark.parametrize("dataset", ["dubai_aerial", "isprs_potsdam", "loveda"])
def test_sample_class_colors_distinct(samples_dir, dataset):
    names = json.loads((samples_dir / dataset / "classes.json").read_text())["classes"]
    colors = [class_color(name) for name in names]
    assert len(set(colors)) == len(names), dict(zip(names, colors))
    assert class_palette(names) == colors


def test_class_palette_distinct_for_72_names():
    names = [f"category {index}" for index in range(72)]
    palette = class_palette(names)
    assert len(set(palette)) == 72
    assert class_palette(names) == palette
    # An alias of a fixed colour keeps its own colour only where it would not repeat one.
    assert class_palette(["grass", "low vegetation"])[0] == class_color("grass")
    assert class_palette(["grass", "low vegetation"])[1] != class_color("grass")


def test_colorize_values():
    painted = colorize(LABELS, NAMES, ignore_label=255, ignore_color=(1, 2, 3))
    palette = class_palette(NAMES)
    assert painted.shape == (3, 4, 3)
    assert painted.dtype == np.uint8
    assert tuple(painted[0, 0]) == palette[0]
    assert tuple(painted[0, 2]) == palette[1]
    assert tuple(painted[2, 0]) == palette[3]
    assert tuple(painted[0, 3]) == (1, 2, 3)
    np.testing.assert_array_equal(colorize(torch.as_tensor(LABELS), NAMES), colorize(LABELS, NAMES))


def test_colorize_rejects_invalid_values():
    with pytest.raises(ValueError, match=r"value\(s\) \[7\]"):
        colorize(np.array([[0, 7]]), NAMES)
    with pytest.raises(ValueError, match="H x W integer array"):
        colorize(np.zeros((2, 2), dtype=np.float32), NAMES)


def test_overlay_blends_only_class_pixels():
    image = np.full((3, 4, 3), 100, dtype=np.uint8)
    colors = colorize(LABELS, NAMES)
    np.testing.assert_array_equal(overlay(image, LABELS, NAMES, alpha=0.0), image)

    opaque = overlay(image, LABELS, NAMES, alpha=1.0)
    np.testing.assert_array_equal(opaque[LABELS != 255], colors[LABELS != 255])
    np.testing.assert_array_equal(opaque[LABELS == 255], image[LABELS == 255])

    half = overlay(image, LABELS, NAMES, alpha=0.5)
    expected = np.rint(0.5 * 100 + 0.5 * colors[0, 0].astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(half[0, 0], expected)


def test_overlay_rejects_bad_input():
    image = np.zeros((3, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, LABELS, NAMES, alpha=1.5)
    with pytest.raises(ValueError, match="image size 3 x 5 differs from label map size 3 x 4"):
        overlay(np.zeros((3, 5, 3), dtype=np.uint8), LABELS, NAMES)
    with pytest.raises(ValueError, match="must be uint8"):
        overlay(image.astype(np.uint16), LABELS, NAMES)


def test_overlay_with_region_names_keeps_size():
    image = np.full((48, 64, 3), 90, dtype=np.uint8)
    labels = np.zeros((48, 64), dtype=np.int64)
    labels[:, 32:] = 2
    drawn = overlay(image, labels, NAMES, alpha=0.6, label_regions=True)
    assert drawn.shape == (48, 64, 3)
    assert drawn.dtype == np.uint8
    assert not np.array_equal(drawn, image)


def test_legend_entries_lists_present_classes():
    entries = legend_entries(LABELS, NAMES)
    palette = class_palette(NAMES)
    assert entries == [("building", palette[0]), ("road", palette[1]), ("solar panel", palette[3])]
    assert legend_entries(np.full((2, 2), 255), NAMES) == []


def test_add_legend_right_holds_image_and_colors():
    image = np.full((120, 160, 3), 40, dtype=np.uint8)
    entries = legend_entries(LABELS, NAMES)
    names = [name for name, _ in entries]
    colors = [color for _, color in entries]
    result = add_legend(image, names, colors)

    assert result.shape[0] == 120
    assert result.shape[1] > 160
    np.testing.assert_array_equal(result[:120, :160], image)
    panel = result[:, 160:]
    for color in colors:
        assert colour_pixels(panel, color) > 0, color
    assert colour_pixels(panel, class_color("water")) == 0


def test_add_legend_bottom_wraps_into_rows():
    image = np.full((100, 90, 3), 40, dtype=np.uint8)
    names = [f"class number {index}" for index in range(5)]
    colors = class_palette(names)
    result = add_legend(image, names, colors, position="bottom")
    assert result.shape[0] > 100
    np.testing.assert_array_equal(result[:100, :90], image)
    for color in colors:
        assert colour_pixels(result[100:], color) > 0, color


def test_add_legend_scales_with_image():
    small = add_legend(np.zeros((200, 200, 3), np.uint8), ["building"], [(220, 20, 60)])
    large = add_legend(np.zeros((1600, 1600, 3), np.uint8), ["building"], [(220, 20, 60)])
    assert colour_pixels(large, (220, 20, 60)) > 16 * colour_pixels(small, (220, 20, 60)) / 2
    assert large.shape[1] - 1600 > 4 * (small.shape[1] - 200)


def test_add_legend_rejects_bad_input():
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 class names but 1 colours"):
        add_legend(image, ["a", "b"], [(0, 0, 0)])
    with pytest.raises(ValueError, match="'left'"):
        add_legend(image, ["a"], [(0, 0, 0)], position="left")
    np.testing.assert_array_equal(add_legend(image, [], []), image)


def test_draw_segmentation_on_real_sample(samples_dir, tmp_path):
    folder: Path = samples_dir / "dubai_aerial"
    names = json.loads((folder / "classes.json").read_text())["classes"]
    image = np.asarray(Image.open(folder / "images" / "dubai_t1_009.jpg").convert("RGB"))
    labels = np.asarray(Image.open(folder / "labels" / "dubai_t1_009.png"))

    drawn = draw_segmentation(image, labels, names, alpha=0.5)
    assert drawn.shape[0] == image.shape[0]
    assert drawn.shape[1] > image.shape[1]
    panel = drawn[:, image.shape[1]:]
    entries = legend_entries(labels, names)
    assert [name for name, _ in entries] == names
    for _, color in entries:
        assert colour_pixels(panel, color) > 0, color
    Image.fromarray(drawn).save(tmp_path / "dubai_t1_009_overlay.png")
    assert (tmp_path / "dubai_t1_009_overlay.png").stat().st_size > 0


def test_benchmark_palettes_distinct(class_lists_dir):
    checked = 0
    for path in sorted(class_lists_dir.glob("*.json")):
        for class_list in json.loads(path.read_text())["lists"]:
            # SegEarth-OV lists give synonyms per class; the first one names the class.
            names = [c[0] if isinstance(c, list) else c for c in class_list["classes"]]
            if len(names) > 72:
                continue
            palette = class_palette(names)
            assert len(set(palette)) == len(names), (path.name, names)
            checked += 1
    assert checked > 20


def test_palette_distinct_beyond_hashed_colours(class_lists_dir):
    names = [f"class {index}" for index in range(300)]

    palette = class_palette(names)

    assert len(set(palette)) == 300
    assert palette == class_palette(names)
