"""tools/convert_rgb_labels.py on real Dubai, Potsdam and LoveDA labels and on generated ones."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"
ISPRS_COLOURS = [
    (255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)
]


@pytest.fixture(scope="module")
def convert():
    # The scripts import each other as top-level modules, as they do when run from tools/.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS_DIR))
        return importlib.import_module("convert_rgb_labels")


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def dubai_user_table(samples_dir: Path) -> dict:
    """The Dubai colour map of the sample's classes.json, as a user table."""
    info = json.loads((samples_dir / "dubai_aerial" / "classes.json").read_text())
    index = {name.lower(): i for i, name in enumerate(info["classes"])}
    table = {
        colour: index.get(name.lower(), info["ignore_index"])
        for name, colour in info["source_colour_map"].items()
    }
    assert table["#9B9B9B"] == 255
    return {"mode": "rgb", "table": table}


def test_user_table_reproduces_dubai_labels(convert, samples_dir, tmp_path, capsys):
    table_file = tmp_path / "dubai.json"
    table_file.write_text(json.dumps(dubai_user_table(samples_dir)))
    code = convert.main([
        "--table", str(table_file),
        "--input", str(samples_dir / "dubai_aerial" / "labels_rgb"),
        "--output", str(tmp_path / "out"),
    ])

    assert code == 0
    assert "Every pixel matched the table." in capsys.readouterr().out
    expected = sorted((samples_dir / "dubai_aerial" / "labels").glob("*.png"))
    assert len(expected) == 10
    for path in expected:
        np.testing.assert_array_equal(load(tmp_path / "out" / path.name), load(path))


def test_builtin_dubai_table_matches_user_table(convert, samples_dir):
    builtin = convert.load_table("dubai_aerial")
    user = convert.table_from_json(dubai_user_table(samples_dir), "user")
    assert builtin.mode == "rgb"
    assert builtin.mapping == user.mapping


def test_mmseg_table_reproduces_potsdam_sample(convert, samples_dir):
    folder = samples_dir / "isprs_potsdam"
    table = convert.load_table("potsdam:mmseg")
    for path in sorted((folder / "labels_source").glob("*.png")):
        index_map, unknown = convert.convert_label(load(path), table)
        np.testing.assert_array_equal(index_map, load(folder / "labels" / path.name))
        assert not unknown


def test_loveda_table_reproduces_loveda_samples(convert, samples_dir):
    folder = samples_dir / "loveda"
    table = convert.load_table("loveda")
    paths = sorted((folder / "labels_source").glob("*.png"))
    assert len(paths) == 3
    for path in paths:
        index_map, unknown = convert.convert_label(load(path), table)
        np.testing.assert_array_equal(index_map, load(folder / "labels" / path.name))
        assert not unknown


def isprs_scene(seed: int = 0):
    """A random ISPRS colour label, its expected indices, and the planted unknown colour."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 6, size=(31, 29))
    rgb = np.asarray(ISPRS_COLOURS, dtype=np.uint8)[classes]
    expected = classes.astype(np.uint8)
    rgb[0, :7] = (0, 0, 0)
    expected[0, :7] = 255
    rgb[5:8, 3:5] = (10, 20, 30)
    expected[5:8, 3:5] = 255
    return rgb, expected


def test_isprs_colours_convert_and_unknown_counted(convert):
    rgb, expected = isprs_scene()
    index_map, unknown = convert.convert_label(rgb, convert.load_table("potsdam"))
    np.testing.assert_array_equal(index_map, expected)
    # Black is the eroded boundary, a known ignore colour, so only the planted colour counts.
    assert dict(unknown) == {"#0A141E": 6}


def test_command_line_reports_unknown_colours(convert, tmp_path, capsys):
    rgb, expected = isprs_scene(seed=1)
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in" / "top_vaihingen_area1_noBoundary.png")
    code = convert.main([
        "--table", "vaihingen:isprs_rgb", "--input", str(tmp_path / "in"),
        "--output", str(tmp_path / "out"), "--strip-suffix", "_noBoundary",
    ])

    assert code == 0
    report = capsys.readouterr().out
    assert "6 pixels (0.667%) in 1 files" in report
    assert "#0A141E (6 px)" in report
    np.testing.assert_array_equal(load(tmp_path / "out" / "top_vaihingen_area1.png"), expected)


def test_binarize_snaps_blended_colours(convert):
    rgb = np.array([[[250, 3, 2], [200, 200, 140], [10, 250, 250]]], dtype=np.uint8)
    table = convert.load_table("potsdam")
    snapped, unknown = convert.convert_label(rgb, table, binarize=128)
    np.testing.assert_array_equal(snapped, [[5, 0, 2]])
    assert not unknown
    raw, unknown = convert.convert_label(rgb, table)
    np.testing.assert_array_equal(raw, [[255, 255, 255]])
    assert sum(unknown.values()) == 3


def test_binarize_needs_pure_table(convert):
    with pytest.raises(ValueError, match="uavid:uavid_rgb"):
        convert.convert_label(
            np.zeros((2, 2, 3), np.uint8), convert.load_table("uavid"), binarize=128
        )


def test_uavid_colours(convert):
    colours = [(0, 0, 0), (128, 0, 0), (128, 64, 128), (192, 0, 192), (0, 128, 0),
               (128, 128, 0), (64, 64, 0), (64, 0, 128)]
    rgb = np.array([colours], dtype=np.uint8)
    index_map, unknown = convert.convert_label(rgb, convert.load_table("uavid"))
    np.testing.assert_array_equal(index_map, [list(range(8))])
    assert not unknown


def test_index_tables(convert):
    floodnet = np.array([[0, 9, 12], [3, 12, 5]], dtype=np.uint8)
    index_map, unknown = convert.convert_label(floodnet, convert.load_table("floodnet"))
    np.testing.assert_array_equal(index_map, [[0, 9, 255], [3, 255, 5]])
    assert dict(unknown) == {12: 2}

    samrs = np.array([[255, 0, 17], [3, 18, 255]], dtype=np.uint8)
    index_map, unknown = convert.convert_label(samrs, convert.load_table("samrs_sota"))
    np.testing.assert_array_equal(index_map, [[0, 1, 18], [4, 255, 0]])
    assert dict(unknown) == {18: 1}

    oem = np.array([[0, 8, 9]], dtype=np.uint16)
    index_map, unknown = convert.convert_label(oem, convert.load_table("openearthmap"))
    np.testing.assert_array_equal(index_map, [[0, 8, 255]])
    assert dict(unknown) == {9: 1}


def test_index_labels_from_palette_png(convert, tmp_path):
    label = Image.fromarray(np.array([[1, 2], [0, 7]], dtype=np.uint8), mode="P")
    label.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (256 * 3 - 9))
    label.save(tmp_path / "p.png")
    values = convert.read_label_array(tmp_path / "p.png", "index")
    np.testing.assert_array_equal(values, [[1, 2], [0, 7]])


def test_mode_mismatch_rejected(convert):
    with pytest.raises(ValueError, match="index label already"):
        convert.convert_label(np.zeros((3, 3), np.uint8), convert.load_table("uavid"))
    with pytest.raises(ValueError, match="colour label"):
        convert.convert_label(np.zeros((3, 3, 3), np.uint8), convert.load_table("floodnet"))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"mode": "hsv", "table": {"#000000": 0}}, "mode"),
        ({"mode": "rgb", "table": {}}, "non-empty"),
        ({"mode": "rgb", "table": {"#00000": 0}}, "'#00000'"),
        ({"mode": "rgb", "table": {"1,2,300": 0}}, "0-255"),
        ({"mode": "rgb", "table": {"#000000": 256}}, "output value"),
        ({"mode": "rgb", "table": {"#000000": 0, "0,0,0": 1}}, "twice"),
        ({"mode": "index", "table": {"x": 0}}, "'x'"),
        ({"mode": "index", "table": {"1": 0}, "ignore_value": -1}, "ignore_value"),
    ],
)
def test_invalid_user_tables(convert, data, message):
    with pytest.raises(ValueError, match=message):
        convert.table_from_json(data, "my_table.json")


def test_parse_color_forms(convert):
    assert convert.parse_color("#3C1098") == 0x3C1098
    assert convert.parse_color("110, 193, 228") == (110 << 16) | (193 << 8) | 228


def test_unknown_builtin_table_lists_known(convert):
    with pytest.raises(KeyError, match="potsdam:isprs_rgb"):
        convert.load_table("potsdam:nope")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        convert.load_table("missing.json")


def test_every_builtin_table_loads(convert):
    tables = convert.builtin_tables()
    assert set(tables) >= {"potsdam", "vaihingen", "uavid", "floodnet", "openearthmap", "loveda"}
    for benchmark, entries in tables.items():
        for name in entries:
            table = convert.load_table(f"{benchmark}:{name}")
            assert table.mapping
