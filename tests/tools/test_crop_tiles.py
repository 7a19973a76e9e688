"""tools/crop_tiles.py: tile windows, edge handling, label alignment and the command line."""

import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def crop_tiles():
    # The scripts import each other as top-level modules, as they do when run from tools/.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS_DIR))
        return importlib.import_module("crop_tiles")


def coordinate_image(height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8 image whose channels are x, y and 7 (so padding, 0, is recognisable)."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs, ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8)


def coordinate_label(height: int, width: int) -> np.ndarray:
    """H x W label with values below 251, distinct for neighbouring pixels."""
    ys, xs = np.mgrid[0:height, 0:width]
    return ((ys * width + xs) % 251).astype(np.uint8)


@pytest.mark.parametrize(
    "size, tile, stride, edge, expected",
    [
        (10, 4, 4, "pad", [0, 4, 8]),
        (10, 4, 4, "keep", [0, 4, 8]),
        (10, 4, 4, "shift", [0, 4, 6]),
        (10, 4, 4, "drop", [0, 4]),
        (10, 4, 3, "pad", [0, 3, 6]),
        (10, 4, 3, "shift", [0, 3, 6]),
        (11, 4, 3, "shift", [0, 3, 6, 7]),
        (8, 4, 4, "pad", [0, 4]),
        (3, 4, 4, "pad", [0]),
        (3, 4, 4, "shift", [0]),
        (3, 4, 4, "keep", [0]),
        (3, 4, 4, "drop", []),
        (4, 4, 4, "drop", [0]),
    ],
)
def test_tile_starts_per_edge_mode(crop_tiles, size, tile, stride, edge, expected):
    assert crop_tiles.tile_starts(size, tile, stride, edge) == expected


@pytest.mark.parametrize("edge", ["pad", "shift", "keep", "drop"])
def test_tiles_match_source_and_align(crop_tiles, edge):
    height, width, tile = 23, 37, 8
    image, label = coordinate_image(height, width), coordinate_label(height, width)
    coverage = np.zeros((height, width), dtype=int)
    tiles = list(crop_tiles.iter_tiles(image, label, tile=tile, stride=tile, edge=edge))

    for window, image_tile, label_tile in tiles:
        assert image_tile.shape[:2] == label_tile.shape
        assert image_tile.shape[:2] == (window.y1 - window.y0, window.x1 - window.x0)
        if edge in ("pad", "shift", "drop"):
            assert label_tile.shape == (tile, tile)
        inside_y, inside_x = min(window.y1, height), min(window.x1, width)
        rows, cols = inside_y - window.y0, inside_x - window.x0
        np.testing.assert_array_equal(
            image_tile[:rows, :cols], image[window.y0 : inside_y, window.x0 : inside_x]
        )
        np.testing.assert_array_equal(
            label_tile[:rows, :cols], label[window.y0 : inside_y, window.x0 : inside_x]
        )
        # The part past the border is padding: 0 in the image, 255 (ignore) in the label.
        assert (label_tile[rows:, :] == 255).all()
        assert (label_tile[:, cols:] == 255).all()
        assert (image_tile[rows:, :] == 0).all()
        assert (image_tile[:, cols:] == 0).all()
        coverage[window.y0 : inside_y, window.x0 : inside_x] += 1

    if edge in ("pad", "keep"):
        assert (coverage == 1).all()
    elif edge == "shift":
        assert (coverage >= 1).all()
        assert coverage.max() == 4
        assert all(w.x1 <= width for w, _, _ in tiles)
        assert all(w.y1 <= height for w, _, _ in tiles)
    else:
        assert (coverage[:16, :32] == 1).all()
        assert (coverage[16:, :] == 0).all()
        assert (coverage[:, 32:] == 0).all()


def test_tile_count_and_keep_sizes(crop_tiles):
    windows = crop_tiles.tile_windows(23, 37, 8, 8, "keep")
    assert len(windows) == 3 * 5
    assert windows[-1] == crop_tiles.Window(32, 16, 37, 23)
    assert crop_tiles.tile_windows(23, 37, 0, 0, "pad") == [crop_tiles.Window(0, 0, 37, 23)]


def test_overlapping_stride(crop_tiles):
    windows = crop_tiles.tile_windows(10, 10, 6, 4, "shift")
    assert [w.x0 for w in windows[:2]] == [0, 4]
    assert {w.x1 for w in windows} == {6, 10}


@pytest.mark.parametrize(
    "tile, stride, edge, message",
    [(8, 9, "pad", "stride"), (8, 0, "pad", "stride"), (-1, 1, "pad", "tile"), (8, 8, "x", "edge")],
)
def test_invalid_tiling_rejected(crop_tiles, tile, stride, edge, message):
    with pytest.raises(ValueError, match=message):
        crop_tiles.tile_windows(10, 10, tile, stride, edge)


def test_label_size_mismatch_rejected(crop_tiles):
    with pytest.raises(ValueError, match="differs from image size 5x4"):
        list(crop_tiles.iter_tiles(np.zeros((4, 5, 3), np.uint8), np.zeros((4, 6), np.uint8),
                                   tile=2, stride=2, edge="pad"))


def test_find_files_flattens_nested_folders(crop_tiles, tmp_path):
    for seq in ("seq1", "seq2"):
        folder = tmp_path / seq / "Labels"
        folder.mkdir(parents=True)
        (folder / "000000_lab.png").write_bytes(b"")
    found = crop_tiles.find_files(
        tmp_path, "*/Labels/*.png", path_names=True, drop_dirs=("Labels",), strip_suffix="_lab"
    )
    assert sorted(found) == ["seq1_000000", "seq2_000000"]
    assert found["seq2_000000"] == tmp_path / "seq2" / "Labels" / "000000_lab.png"
    with pytest.raises(ValueError, match="--path-names"):
        crop_tiles.find_files(tmp_path, "*/Labels/*.png")


def test_find_files_rejects_name_clash(crop_tiles, tmp_path):
    for name in ("a.png", "a_lab.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="both map to the name 'a'"):
        crop_tiles.find_files(tmp_path, "*.png", strip_suffix="_lab")


def test_stems_file_drops_image_extensions(crop_tiles, tmp_path):
    split = tmp_path / "val.txt"
    split.write_text("aachen_11.tif\n\nkoeln_50.tif\ntop_mosaic_09cm_area2\n")
    stems = crop_tiles.read_stems("2_13, 2_14.png", split)
    assert stems == ["2_13", "2_14", "aachen_11", "koeln_50", "top_mosaic_09cm_area2"]
    assert crop_tiles.read_stems(None, None) is None


def test_read_label_rejects_colour_labels(crop_tiles, tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="convert_rgb_labels"):
        crop_tiles.read_label(path)


def write_scene(folder: Path, stem: str, image: np.ndarray, label: np.ndarray) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}_RGB.png")
    Image.fromarray(label).save(folder / "labels" / f"{stem}_label.png")


def test_command_line_writes_aligned_tiles(crop_tiles, tmp_path, capsys):
    image, label = coordinate_image(10, 13), coordinate_label(10, 13)
    write_scene(tmp_path / "raw", "top_1", image, label)
    write_scene(tmp_path / "raw", "top_2", image, label)
    out = tmp_path / "out"
    code = crop_tiles.main([
        "--images", str(tmp_path / "raw" / "images"), "--image-suffix", "_RGB",
        "--labels", str(tmp_path / "raw" / "labels"), "--label-suffix", "_label",
        "--out-images", str(out / "img"), "--out-labels", str(out / "ann"),
        "--tile", "8", "--stems", "top_2",
    ])

    assert code == 0
    assert "Wrote 4 tiles from 1 images" in capsys.readouterr().out
    names = sorted(p.name for p in (out / "ann").iterdir())
    assert names == [
        "top_2_0_0_8_8.png", "top_2_0_8_8_16.png", "top_2_8_0_16_8.png", "top_2_8_8_16_16.png"
    ]
    assert sorted(p.name for p in (out / "img").iterdir()) == names
    corner = np.asarray(Image.open(out / "ann" / "top_2_8_8_16_16.png"))
    np.testing.assert_array_equal(corner[:2, :5], label[8:10, 8:13])
    assert (corner[2:, :] == 255).all()
    image_tile = np.asarray(Image.open(out / "img" / "top_2_8_0_16_8.png"))
    np.testing.assert_array_equal(image_tile[:, :5], image[0:8, 8:13])


def test_command_line_reports_missing_label(crop_tiles, tmp_path, capsys):
    write_scene(tmp_path, "top_1", coordinate_image(4, 4), coordinate_label(4, 4))
    (tmp_path / "labels" / "top_1_label.png").unlink()
    Image.fromarray(coordinate_label(4, 4)).save(tmp_path / "labels" / "other_label.png")
    code = crop_tiles.main([
        "--images", str(tmp_path / "images"), "--image-suffix", "_RGB",
        "--labels", str(tmp_path / "labels"), "--label-suffix", "_label",
        "--out-images", str(tmp_path / "o1"), "--out-labels", str(tmp_path / "o2"), "--tile", "2",
    ])
    assert code == 2
    assert "have no label (e.g. top_1)" in capsys.readouterr().err


def test_command_line_rejects_unknown_stem(crop_tiles, tmp_path, capsys):
    write_scene(tmp_path, "top_1", coordinate_image(4, 4), coordinate_label(4, 4))
    code = crop_tiles.main([
        "--images", str(tmp_path / "images"), "--image-suffix", "_RGB",
        "--out-images", str(tmp_path / "o1"), "--tile", "0", "--stems", "top_9",
    ])
    assert code == 2
    assert "top_9" in capsys.readouterr().err
