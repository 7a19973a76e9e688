#!/usr/bin/env python
"""Turn iSAID's COCO-format instance annotations into tiled semantic label PNGs.

iSAID annotates every object of 15 categories with polygons, in one COCO json per split
(``instances_*.json`` or ``iSAID_<split>.json``). This script rasterises the polygons with
pycocotools into one label map per image, in the class order of
``datasets/class_lists/isaid.json``, and cuts image and label into tiles with the same edge
rules as tools/crop_tiles.py.

Label values:

* Category -> class by name: lower case, "_" and "-" read as spaces, so "Ground_Track_Field"
  is "ground track field". The category ids of the json play no part, because copies of the
  iSAID json in circulation number the categories differently. ``--category-map`` adds names.
* Background (class 0): every pixel that no polygon covers. The annotations mark no pixel as
  unlabelled, so nothing inside an image is ignored.
* Overlaps: objects are drawn from the largest area to the smallest, so a small object on a
  large one (a car on a bridge) keeps its class.
* 255 (ignore): only the padding of edge tiles (``--edge pad``).

Example (the iSAID validation split, which the benchmark scores because test labels are
withheld)::

    python tools/prepare_isaid.py --annotations raw/iSAID/val/iSAID_val.json \\
        --images raw/iSAID/val/images --output datasets/isaid --split val \\
        --tile 1024 --stride 1024 --edge pad
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils

# A sibling script: Python puts this folder on sys.path when a script here is run.
from crop_tiles import (
    EDGE_MODES,
    add_common_arguments,
    check_tiling,
    read_image,
    start_command_line,
    write_tiles,
)

logger = logging.getLogger(__name__)

CLASS_LIST = Path(__file__).resolve().parents[1] / "datasets" / "class_lists" / "isaid.json"
# A COCO polygon needs at least three points (six numbers). pycocotools would read a list of
# four numbers as a box, so shorter polygons are skipped.
_MIN_POLYGON_COORDS = 6


@dataclass
class PrepareReport:
    """Counts of one run."""

    images: int = 0
    tiles: int = 0
    objects: int = 0
    skipped_polygons: int = 0


def normalize_name(name: str) -> str:
    """Return ``name`` in lower case with "_" and "-" as single spaces."""
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def read_class_list(path: Path = CLASS_LIST) -> Tuple[List[str], int]:
    """Return the iSAID class names and the background class index from a class list."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("background_class") is None:
        raise ValueError(f"{path} has no 'background_class'; iSAID labels need one.")
    return list(data["classes"]), int(data["background_class"])


def category_values(
    categories: Sequence[Dict[str, Any]],
    classes: Sequence[str],
    category_map: Optional[Dict[str, str]] = None,
) -> Dict[int, int]:
    """Map each COCO category id to its label value, matching names (see the docstring).

    Args:
        categories: the json's "categories" entries ("id", "name").
        classes: class names in label order.
        category_map: extra {category name: class name} pairs, tried first.

    Raises:
        ValueError: a category matches no class; the message lists the classes.
    """
    class_index = {normalize_name(name): i for i, name in enumerate(classes)}
    extra = {normalize_name(k): normalize_name(v) for k, v in (category_map or {}).items()}
    values, unmatched = {}, []
    for category in categories:
        name = normalize_name(str(category["name"]))
        name = extra.get(name, name)
        if name not in class_index:
            unmatched.append(category["name"])
            continue
        values[int(category["id"])] = class_index[name]
    if unmatched:
        raise ValueError(
            f"categories {unmatched} match no class of {list(classes)}; map them with "
            "--category-map '{\"<category>\": \"<class>\"}'."
        )
    return values


def _polygon_window(
    polygons: Sequence[Sequence[float]], height: int, width: int
) -> Tuple[int, int, int, int]:
    coords = np.concatenate([np.asarray(p, dtype=np.float64) for p in polygons])
    xs, ys = coords[0::2], coords[1::2]
    x0 = int(np.clip(np.floor(xs.min()), 0, width))
    y0 = int(np.clip(np.floor(ys.min()), 0, height))
    x1 = int(np.clip(np.ceil(xs.max()) + 1, 0, width))
    y1 = int(np.clip(np.ceil(ys.max()) + 1, 0, height))
    return x0, y0, x1, y1


def annotation_mask(
    segmentation: Any, height: int, width: int
) -> Optional[Tuple[np.ndarray, int, int]]:
    """Rasterise one COCO segmentation (polygons or RLE).

    Polygons are rasterised inside their bounding box only, which keeps memory small on the
    large iSAID images. A shift by whole pixels leaves pycocotools' rasterisation unchanged.

    Returns:
        ``(mask, x0, y0)``: a boolean mask and the image position of its top-left pixel, or
        None when the segmentation has no usable polygon.
    """
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, height, width)
        return mask_utils.decode(rle).astype(bool), 0, 0
    polygons = [p for p in segmentation if len(p) >= _MIN_POLYGON_COORDS]
    if not polygons:
        return None
    x0, y0, x1, y1 = _polygon_window(polygons, height, width)
    if x1 <= x0 or y1 <= y0:
        return None
    shifted = [
        (np.asarray(p, dtype=np.float64) - np.tile([x0, y0], len(p) // 2)).tolist()
        for p in polygons
    ]
    rles = mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool), x0, y0


def rasterize_annotations(
    annotations: Iterable[Dict[str, Any]],
    height: int,
    width: int,
    values: Dict[int, int],
    background_value: int,
) -> Tuple[np.ndarray, int, int]:
    """Paint the annotations of one image into a label map.

    Args:
        annotations: COCO annotations ("segmentation", "category_id", optional "area").
        height, width: image size in pixels.
        values: category id -> label value (see :func:`category_values`).
        background_value: value of pixels that no annotation covers.

    Returns:
        The H x W uint8 label map, the number of objects drawn and of skipped polygons.
    """
    label = np.full((height, width), background_value, dtype=np.uint8)
    drawn = skipped = 0

    # Largest first, so that small objects lying on larger ones stay visible.
    ordered = sorted(annotations, key=lambda a: float(a.get("area", 0.0)), reverse=True)
    for annotation in ordered:
        segmentation = annotation.get("segmentation")
        if not isinstance(segmentation, dict):
            skipped += sum(1 for p in segmentation or [] if len(p) < _MIN_POLYGON_COORDS)
        rasterized = annotation_mask(segmentation, height, width) if segmentation else None
        if rasterized is None:
            continue
        category = int(annotation["category_id"])
        if category not in values:
            raise ValueError(
                f"annotation {annotation.get('id')} has category id {category}, which the "
                "json's 'categories' do not list."
            )
        mask, x0, y0 = rasterized
        region = label[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        region[mask] = values[category]
        drawn += 1
    return label, drawn, skipped


def load_coco(path: Path) -> Dict[str, Any]:
    """Read a COCO json and check that it has images, annotations and categories."""
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} not found.")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ValueError(f"{path} is not a COCO instance file: it lacks {missing}.")
    return data


def prepare_isaid(
    annotation_file: Path,
    image_dir: Path,
    output_dir: Path,
    split: str,
    *,
    tile: int,
    stride: int,
    edge: str,
    class_list: Path = CLASS_LIST,
    category_map: Optional[Dict[str, str]] = None,
) -> PrepareReport:
    """Write ``output_dir/img_dir/<split>`` and ``output_dir/ann_dir/<split>`` tiles.

    Raises:
        FileNotFoundError: the json or an image it lists is missing.
        ValueError: unknown categories, or an image whose size differs from the json.
    """
    check_tiling(tile, stride, edge)
    coco = load_coco(annotation_file)
    classes, background_value = read_class_list(class_list)
    values = category_values(coco["categories"], classes, category_map)
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(int(annotation["image_id"]), []).append(annotation)

    report = PrepareReport()
    out_images, out_labels = output_dir / "img_dir" / split, output_dir / "ann_dir" / split
    for entry in sorted(coco["images"], key=lambda e: e["file_name"]):
        path = image_dir / entry["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"Image {path} listed in {annotation_file} not found.")
        image = read_image(path)
        height, width = image.shape[:2]
        if (entry.get("height", height), entry.get("width", width)) != (height, width):
            raise ValueError(
                f"{path} is {width}x{height} but {annotation_file} lists it as "
                f"{entry.get('width')}x{entry.get('height')}; check that both come from the "
                "same iSAID split."
            )
        label, drawn, skipped = rasterize_annotations(
            by_image.get(int(entry["id"]), []), height, width, values, background_value
        )
        report.tiles += write_tiles(
            Path(entry["file_name"]).stem,
            image,
            label,
            out_images,
            out_labels,
            tile=tile,
            stride=stride,
            edge=edge,
        )
        report.images += 1
        report.objects += drawn
        report.skipped_polygons += skipped
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--annotations", type=Path, required=True, help="COCO json of one split")
    add("--images", type=Path, required=True, help="folder of that split's images")
    add("--output", type=Path, required=True, help="benchmark folder, e.g. datasets/isaid")
    add("--split", default="val", help="split folder name under img_dir/ and ann_dir/")
    add("--tile", type=int, default=1024, help="tile side in pixels; 0 keeps whole images")
    add("--stride", type=int, help="pixels between tile starts (default: --tile)")
    add("--edge", choices=EDGE_MODES, default="pad", help="edge handling (default: pad)")
    add("--category-map", help="JSON object of extra {category name: class name} pairs")
    add_common_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start_command_line(args)
    try:
        category_map = json.loads(args.category_map) if args.category_map else None
        report = prepare_isaid(
            args.annotations,
            args.images,
            args.output,
            args.split,
            tile=args.tile,
            stride=args.stride if args.stride is not None else args.tile,
            edge=args.edge,
            category_map=category_map,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"Wrote {report.tiles} tiles of {report.images} images ({report.objects} objects) to "
        f"{args.output}; skipped {report.skipped_polygons} polygons with fewer than 3 points."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
