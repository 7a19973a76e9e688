"""tools/prepare_isaid.py on a tiny COCO json with known polygons."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"
# pycocotools 2.0 decodes through an __array__ call that NumPy 2 flags; the masks are right.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
# Label values in datasets/class_lists/isaid.json.
BACKGROUND, SHIP, LARGE_VEHICLE, HARBOR = 0, 1, 8, 15


@pytest.fixture(scope="module")
def prepare():
    # The scripts import each other as top-level modules, as they do when run from tools/.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS_DIR))
        return importlib.import_module("prepare_isaid")


def rectangle(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_split(root: Path, *, height=30, width=40, annotations=None, categories=None) -> Path:
    """Write one image P0001.png and a COCO json; return the json path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "images" / "P0001.png")
    if categories is None:
        # Ids in an order unlike the class list, with iSAID's own spelling.
        categories = [
            {"id": 1, "name": "Large_Vehicle"},
            {"id": 2, "name": "ship"},
            {"id": 3, "name": "Harbor"},
        ]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 7, "category_id": 2, "area": 20.0,
             "segmentation": [rectangle(10, 8, 15, 12)]},
            {"id": 2, "image_id": 7, "category_id": 1, "area": 300.0,
             "segmentation": [rectangle(5, 5, 25, 20)]},
            {"id": 3, "image_id": 7, "category_id": 3, "area": 50.0,
             "segmentation": [[30, 22, 39, 22, 30, 29], [1, 1, 2, 2]]},
        ]
    coco = {
        "images": [{"id": 7, "file_name": "P0001.png", "height": height, "width": width}],
        "annotations": annotations,
        "categories": categories,
    }
    path = root / "instances_val.json"
    path.write_text(json.dumps(coco))
    return path


def test_labels_have_classes_at_known_pixels(prepare, tmp_path):
    json_path = make_split(tmp_path / "raw")
    report = prepare.prepare_isaid(
        json_path, tmp_path / "raw" / "images", tmp_path / "isaid", "val",
        tile=0, stride=0, edge="pad",
    )
    label = np.asarray(Image.open(tmp_path / "isaid" / "ann_dir" / "val" / "P0001.png"))

    assert label.shape == (30, 40)
    # The small ship lies on the large vehicle and is drawn after it.
    assert label[10, 12] == SHIP
    assert label[15, 20] == LARGE_VEHICLE
    assert label[6, 6] == LARGE_VEHICLE
    assert label[27, 31] == HARBOR
    assert label[25, 20] == BACKGROUND
    assert label[2, 38] == BACKGROUND
    assert (label == SHIP).sum() == 5 * 4
    assert set(np.unique(label)) == {BACKGROUND, SHIP, LARGE_VEHICLE, HARBOR}
    assert (report.images, report.tiles, report.objects, report.skipped_polygons) == (1, 1, 3, 1)
    image = np.asarray(Image.open(tmp_path / "isaid" / "img_dir" / "val" / "P0001.png"))
    assert image.shape == (30, 40, 3)


def test_tiles_are_padded_with_ignore(prepare, tmp_path):
    json_path = make_split(tmp_path / "raw")
    report = prepare.prepare_isaid(
        json_path, tmp_path / "raw" / "images", tmp_path / "isaid", "val",
        tile=16, stride=16, edge="pad",
    )
    ann_dir = tmp_path / "isaid" / "ann_dir" / "val"
    assert report.tiles == 2 * 3
    assert sorted(p.name for p in ann_dir.iterdir())[0] == "P0001_0_0_16_16.png"
    corner = np.asarray(Image.open(ann_dir / "P0001_32_16_48_32.png"))
    assert corner[24 - 16, 33 - 32] == HARBOR
    assert (corner[14:, :] == 255).all()
    assert (corner[:, 8:] == 255).all()
    first = np.asarray(Image.open(ann_dir / "P0001_0_0_16_16.png"))
    assert first[10, 12] == SHIP


def test_window_rasterisation_equals_full_image(prepare):
    rng = np.random.default_rng(3)
    height, width = 50, 60
    inside = (rng.uniform(5, 45, size=(6, 2)) * [1.2, 1.0]).ravel().tolist()
    # Parts past the image border are cut off, as in a whole-image rasterisation.
    across_border = [50.5, 40.2, 70.0, 40.2, 70.0, 61.3, 50.5, 61.3]
    polygons = [inside, across_border]
    full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
    mask, x0, y0 = prepare.annotation_mask(polygons, height, width)
    pasted = np.zeros((height, width), dtype=bool)
    pasted[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    assert full.sum() > 0
    np.testing.assert_array_equal(pasted, full.astype(bool))


def test_rle_segmentation(prepare):
    binary = np.zeros((6, 5), dtype=np.uint8, order="F")
    binary[1:3, 2:4] = 1
    rle = mask_utils.encode(binary)
    rle["counts"] = rle["counts"].decode("ascii")
    label, drawn, _ = prepare.rasterize_annotations(
        [{"category_id": 4, "segmentation": rle}], 6, 5, {4: 9}, 0
    )
    assert drawn == 1
    np.testing.assert_array_equal(label == 9, binary.astype(bool))


def test_unknown_category_needs_map(prepare, tmp_path):
    categories = [{"id": 1, "name": "store_tank"}, {"id": 2, "name": "ship"}]
    annotations = [{"id": 1, "image_id": 7, "category_id": 1, "area": 4.0,
                    "segmentation": [rectangle(1, 1, 4, 4)]}]
    json_path = make_split(tmp_path / "raw", categories=categories, annotations=annotations)
    args = (json_path, tmp_path / "raw" / "images", tmp_path / "out", "val")
    with pytest.raises(ValueError, match=r"\['store_tank'\]"):
        prepare.prepare_isaid(*args, tile=0, stride=0, edge="pad")

    prepare.prepare_isaid(
        *args, tile=0, stride=0, edge="pad", category_map={"store tank": "storage tank"}
    )
    label = np.asarray(Image.open(tmp_path / "out" / "ann_dir" / "val" / "P0001.png"))
    assert label[2, 2] == 2


def test_size_mismatch_and_missing_image(prepare, tmp_path):
    json_path = make_split(tmp_path / "raw")
    coco = json.loads(json_path.read_text())
    coco["images"][0]["width"] = 41
    json_path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="40x30 but"):
        prepare.prepare_isaid(json_path, tmp_path / "raw" / "images", tmp_path / "o", "val",
                              tile=0, stride=0, edge="pad")
    (tmp_path / "raw" / "images" / "P0001.png").unlink()
    with pytest.raises(FileNotFoundError, match="P0001.png"):
        prepare.prepare_isaid(json_path, tmp_path / "raw" / "images", tmp_path / "o", "val",
                              tile=0, stride=0, edge="pad")


def test_annotation_with_unlisted_category(prepare):
    with pytest.raises(ValueError, match="category id 5"):
        prepare.rasterize_annotations(
            [{"id": 3, "category_id": 5, "segmentation": [rectangle(0, 0, 2, 2)]}], 4, 4, {1: 1}, 0
        )


def test_command_line(prepare, tmp_path, capsys):
    json_path = make_split(tmp_path / "raw")
    code = prepare.main([
        "--annotations", str(json_path), "--images", str(tmp_path / "raw" / "images"),
        "--output", str(tmp_path / "isaid"), "--tile", "32", "--edge", "shift",
    ])
    assert code == 0
    assert "Wrote 2 tiles of 1 images (3 objects)" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "isaid" / "ann_dir" / "val").iterdir())
    assert names == ["P0001_0_0_32_32.png", "P0001_8_0_40_32.png"]

    code = prepare.main(["--annotations", str(tmp_path / "none.json"), "--images", "x",
                         "--output", str(tmp_path / "o")])
    assert code == 2
    assert "none.json not found" in capsys.readouterr().err
