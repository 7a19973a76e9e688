#!/usr/bin/env python
"""Cut large images, and their label maps, into tiles of a fixed size and stride.

Remote-sensing benchmarks ship scenes of thousands of pixels (ISPRS Potsdam tiles are
6000 x 6000, FloodNet photos 4000 x 3000). This script cuts each image and its label PNG
into square tiles and writes them as PNG files named ``<stem>_<x0>_<y0>_<x1>_<y1>.png``, where
the numbers are the tile's pixel window in the source image (x1 and y1 exclusive).

Edge handling (``--edge``), for a side that the tiles do not divide evenly:

* ``pad`` (default): the last tile runs past the border and is padded, the image with 0 and
  the label with 255 (ignore). With stride == tile every pixel lies in exactly one tile, so
  evaluation counts each pixel once. Its window names the padded extent.
* ``shift``: the last tile is moved back to end at the border, so every tile is full-size
  image content and overlaps its neighbour, as mmsegmentation's Potsdam converter cuts.
  Overlapping pixels are scored twice.
* ``keep``: the last tile is cut at the border and is smaller.
* ``drop``: tiles that would cross the border are left out, so a strip along the right and
  bottom edges is lost. Only for training data.

A side shorter than the tile gives one tile along it: padded for ``pad`` and ``shift``, cut
short for ``keep``, none for ``drop``. ``--tile 0`` copies whole images (written as PNG under
their stem), which also serves to gather a split from nested folders.

Example (ISPRS Potsdam test tiles, after converting the labels, see datasets/README.md)::

    python tools/crop_tiles.py --images raw/2_Ortho_RGB --image-pattern '*.tif' \\
        --image-suffix _RGB --labels raw/labels_index --label-suffix _label \\
        --stems-file potsdam_test.txt --tile 512 --stride 512 \\
        --out-images datasets/potsdam/img_dir/test --out-labels datasets/potsdam/ann_dir/test

The functions are imported by the other preparation scripts in this folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

EDGE_MODES = ("pad", "shift", "keep", "drop")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_FILL = 0
LABEL_IGNORE = 255
# PIL rejects images above about 179 million pixels as a guard against decompression bombs.
# Whole aerial scenes can be larger, so the scripts raise the limit to this many pixels.
DEFAULT_MAX_IMAGE_PIXELS = 1_000_000_000
# How many file names an error lists before it gives only a count.
_SHOWN_FILES = 5


@dataclass(frozen=True)
class Window:
    """A tile's pixel window in its source image.

    x1 and y1 are exclusive. For a padded tile they lie past the image border.
    """

    x0: int
    y0: int
    x1: int
    y1: int

    def suffix(self) -> str:
        """Return the ``_x0_y0_x1_y1`` part of the tile's file name."""
        return f"_{self.x0}_{self.y0}_{self.x1}_{self.y1}"


def check_tiling(tile: int, stride: int, edge: str) -> None:
    """Raise ValueError unless ``tile``, ``stride`` and ``edge`` describe a valid tiling.

    ``tile`` 0 means whole images, and then ``stride`` is not used.
    """
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {EDGE_MODES}, got {edge!r}.")
    if tile < 0:
        raise ValueError(f"tile must be a positive size in pixels or 0 (whole images), got {tile}.")
    if tile > 0 and not 0 < stride <= tile:
        raise ValueError(
            f"stride must lie in 1..tile ({tile}) so that the tiles leave no gap, got {stride}."
        )


def tile_starts(size: int, tile: int, stride: int, edge: str) -> List[int]:
    """Return the start offsets of the tiles along one side of ``size`` pixels."""
    if tile >= size:
        return [] if edge == "drop" and tile > size else [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        if edge in ("pad", "keep"):
            starts.append(starts[-1] + stride)
        elif edge == "shift":
            starts.append(size - tile)
    return starts


def tile_windows(height: int, width: int, tile: int, stride: int, edge: str) -> List[Window]:
    """Return the tile windows of a ``height`` x ``width`` image, row by row.

    Args:
        height, width: image size in pixels.
        tile: tile side in pixels; 0 gives one window, the whole image.
        stride: distance between tile starts in pixels.
        edge: one of ``EDGE_MODES`` (see the module docstring).

    Returns:
        The windows. In "keep" mode border windows are clipped to the image.
    """
    check_tiling(tile, stride, edge)
    if tile == 0:
        return [Window(0, 0, width, height)]
    windows = []
    for y0 in tile_starts(height, tile, stride, edge):
        for x0 in tile_starts(width, tile, stride, edge):
            x1, y1 = x0 + tile, y0 + tile
            if edge == "keep":
                x1, y1 = min(x1, width), min(y1, height)
            windows.append(Window(x0, y0, x1, y1))
    return windows


def crop_window(array: np.ndarray, window: Window, fill: int) -> np.ndarray:
    """Cut ``window`` out of ``array`` (H x W or H x W x C), filling the part past the border.

    Returns:
        A (y1 - y0) x (x1 - x0) [x C] array of the input's dtype.
    """
    height, width = array.shape[:2]
    out_shape = (window.y1 - window.y0, window.x1 - window.x0) + array.shape[2:]
    if window.x1 <= width and window.y1 <= height:
        return array[window.y0 : window.y1, window.x0 : window.x1].copy()
    out = np.full(out_shape, fill, dtype=array.dtype)
    inside = array[window.y0 : min(window.y1, height), window.x0 : min(window.x1, width)]
    out[: inside.shape[0], : inside.shape[1]] = inside
    return out


def iter_tiles(
    image: np.ndarray,
    label: Optional[np.ndarray],
    *,
    tile: int,
    stride: int,
    edge: str,
    image_fill: int = IMAGE_FILL,
    label_fill: int = LABEL_IGNORE,
) -> Iterator[Tuple[Window, np.ndarray, Optional[np.ndarray]]]:
    """Yield ``(window, image_tile, label_tile)`` for each tile of an image and its label.

    Args:
        image: H x W or H x W x C image.
        label: H x W label map of the same size, or None.
        tile, stride, edge: as in :func:`tile_windows`.
        image_fill, label_fill: values of padded pixels.

    Raises:
        ValueError: the label's size differs from the image's.
    """
    height, width = image.shape[:2]
    if label is not None and label.shape[:2] != (height, width):
        raise ValueError(
            f"label size {label.shape[1]}x{label.shape[0]} differs from image size "
            f"{width}x{height}."
        )
    for window in tile_windows(height, width, tile, stride, edge):
        label_tile = None if label is None else crop_window(label, window, label_fill)
        yield window, crop_window(image, window, image_fill), label_tile


def read_image(path: Path) -> np.ndarray:
    """Read an image as an H x W (x C) array, converting palette and CMYK images to RGB."""
    with Image.open(path) as image:
        if image.mode not in ("L", "RGB", "RGBA", "I;16"):
            image = image.convert("RGB")
        return np.asarray(image)


def read_label(path: Path) -> np.ndarray:
    """Read a single-channel label map (a palette PNG gives its indices).

    Raises:
        ValueError: the file has colour channels or values above 255.
    """
    with Image.open(path) as image:
        label = np.asarray(image)
    if label.ndim != 2:
        raise ValueError(
            f"{path} has {label.shape[2]} channels, so it is a colour label; convert it to an "
            "index PNG with tools/convert_rgb_labels.py first."
        )
    if label.size and int(label.max()) > 255:
        raise ValueError(f"{path} has label values up to {int(label.max())}; the limit is 255.")
    return label.astype(np.uint8, copy=False)


def write_png(array: np.ndarray, path: Path) -> None:
    """Write ``array`` as a PNG file, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_tiles(
    key: str,
    image: np.ndarray,
    label: Optional[np.ndarray],
    out_images: Path,
    out_labels: Optional[Path],
    *,
    tile: int,
    stride: int,
    edge: str,
) -> int:
    """Tile one image (and its label), write the tiles and return how many there are.

    With ``tile`` 0 the files are named ``<key>.png``, otherwise ``<key>_<x0>_<y0>_<x1>_<y1>.png``.
    """
    count = 0
    for window, image_tile, label_tile in iter_tiles(
        image, label, tile=tile, stride=stride, edge=edge
    ):
        name = key + ("" if tile == 0 else window.suffix()) + ".png"
        write_png(image_tile, out_images / name)
        if label_tile is not None and out_labels is not None:
            write_png(label_tile, out_labels / name)
        count += 1
    return count


def find_files(
    folder: Path,
    pattern: str,
    *,
    path_names: bool = False,
    drop_dirs: Sequence[str] = (),
    strip_suffix: str = "",
) -> Dict[str, Path]:
    """Find the files under ``folder`` that match ``pattern`` and key them by a flat name.

    The key is the file's stem with ``strip_suffix`` cut from its end. With ``path_names``
    it is the file's path below ``folder`` instead, without the extension and the folder
    names listed in ``drop_dirs``, joined by "_": UAVid's ``seq16/Labels/000000.png`` with
    ``drop_dirs=("Labels",)`` becomes ``seq16_000000``.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: nothing matches, or two files get the same key.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder {folder} not found.")
    found: Dict[str, Path] = {}
    for path in sorted(p for p in folder.glob(pattern) if p.is_file()):
        key = path.stem
        if path_names:
            parts = path.relative_to(folder).with_suffix("").parts
            key = "_".join(part for part in parts if part not in drop_dirs)
        if strip_suffix and key.endswith(strip_suffix):
            key = key[: -len(strip_suffix)]
        if key in found:
            raise ValueError(
                f"{found[key]} and {path} both map to the name {key!r}"
                + ("." if path_names else "; name files by their path with --path-names.")
            )
        found[key] = path
    if not found:
        raise ValueError(f"No file in {folder} matches {pattern!r}.")
    return found


def read_stems(stems: Optional[str], stems_file: Optional[Path]) -> Optional[List[str]]:
    """Return the stems given as a comma-separated list and/or a file (one per line).

    An image extension at the end of an entry is dropped, so split lists such as
    OpenEarthMap's ``val.txt`` (``aachen_11.tif``) work as they are.
    """
    if stems is None and stems_file is None:
        return None
    entries = [s.strip() for s in (stems or "").split(",")]
    if stems_file is not None:
        entries += [s.strip() for s in stems_file.read_text().splitlines()]
    return [
        Path(s).stem if Path(s).suffix.lower() in IMAGE_EXTENSIONS else s for s in entries if s
    ]


def select_keys(
    found: Dict[str, Path], stems: Optional[Sequence[str]], file_kind: str
) -> List[str]:
    """Return the keys of ``found`` to process: all, or exactly ``stems``.

    Raises:
        ValueError: a requested stem was not found.
    """
    if stems is None:
        return sorted(found)
    missing = [s for s in stems if s not in found]
    if missing:
        raise ValueError(
            f"{len(missing)} requested stems have no {file_kind} (e.g. "
            f"{', '.join(missing[:_SHOWN_FILES])}); names are compared after --image-suffix, "
            "--path-names and --drop-dirs are applied."
        )
    return sorted(set(stems))


def check_pairs(images: Dict[str, Path], labels: Dict[str, Path], keys: Sequence[str]) -> None:
    """Raise ValueError if a selected image has no label, or a label matches no image.

    Labels of images that are found but not selected (see ``--stems``) are allowed.
    """
    missing_labels = [k for k in keys if k not in labels]
    orphan_labels = sorted(set(labels) - set(images))
    for missing, partner in ((missing_labels, "label"), (orphan_labels, "image")):
        if missing:
            examples = ", ".join(missing[:_SHOWN_FILES])
            raise ValueError(
                f"{len(missing)} files have no {partner} (e.g. {examples}); check --image-suffix, "
                "--label-suffix and the patterns."
            )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that every preparation script in this folder shares."""
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="largest image (in pixels) that PIL may open",
    )


def start_command_line(args: argparse.Namespace) -> None:
    """Set up logging and PIL's image-size limit for a script run from the command line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\nThe functions")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--images", type=Path, required=True, help="folder of source images")
    add("--out-images", type=Path, required=True, help="folder for the image tiles")
    add("--labels", type=Path, help="folder of single-channel label maps")
    add("--out-labels", type=Path, help="folder for the label tiles")
    add("--tile", type=int, required=True, help="tile side in pixels; 0 copies whole images")
    add("--stride", type=int, help="pixels between tile starts (default: --tile)")
    add("--edge", choices=EDGE_MODES, default="pad", help="edge handling (default: pad)")
    add("--image-pattern", default="*.png", help="glob below --images (default: *.png)")
    add("--label-pattern", default="*.png", help="glob below --labels (default: *.png)")
    add("--image-suffix", default="", help="text cut from the end of image stems")
    add("--label-suffix", default="", help="text cut from the end of label stems")
    add("--path-names", action="store_true", help="name files by their path below the folder")
    add("--drop-dirs", default="", help="with --path-names: folder names left out (comma list)")
    add("--stems", help="comma-separated stems to process (default: all)")
    add("--stems-file", type=Path, help="file with one stem to process per line")
    add_common_arguments(parser)
    return parser


def crop_folders(args: argparse.Namespace) -> Tuple[int, int]:
    """Tile every selected image (and its label) as the command-line arguments request.

    Returns:
        The number of source images and of tiles written.
    """
    stride = args.stride if args.stride is not None else args.tile
    check_tiling(args.tile, stride, args.edge)
    if (args.labels is None) != (args.out_labels is None):
        raise ValueError("--labels and --out-labels must be given together.")
    drop_dirs = tuple(d for d in args.drop_dirs.split(",") if d)
    naming = {"path_names": args.path_names, "drop_dirs": drop_dirs}
    images = find_files(args.images, args.image_pattern, strip_suffix=args.image_suffix, **naming)
    keys = select_keys(images, read_stems(args.stems, args.stems_file), "image")
    labels: Dict[str, Path] = {}
    if args.labels is not None:
        labels = find_files(
            args.labels, args.label_pattern, strip_suffix=args.label_suffix, **naming
        )
        check_pairs(images, labels, keys)

    total = 0
    for key in keys:
        label = read_label(labels[key]) if labels else None
        written = write_tiles(
            key,
            read_image(images[key]),
            label,
            args.out_images,
            args.out_labels,
            tile=args.tile,
            stride=stride,
            edge=args.edge,
        )
        logger.info("%s: %d tiles.", key, written)
        total += written
    return len(keys), total


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start_command_line(args)
    try:
        num_images, num_tiles = crop_folders(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {num_tiles} tiles from {num_images} images to {args.out_images}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
