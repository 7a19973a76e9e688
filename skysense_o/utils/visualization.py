"""Colours, overlays and legends for semantic-segmentation label maps.

A class keeps its colour across images, runs and machines because the colour depends on its
name alone. Common remote-sensing classes take a fixed conventional colour. Any other name takes
the colour that its SHA-256 digest selects from a palette of well-separated hues and shades.
"""

import colorsys
import hashlib
import logging
import math
import re
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    # Only for annotations: the module itself needs no torch, so the colours load quickly.
    import torch

logger = logging.getLogger(__name__)

RGB = Tuple[int, int, int]
# NumPy arrays, or torch tensors (anything with ``detach``), which are copied to the CPU.
ArrayLike = Union[np.ndarray, "torch.Tensor"]

# Conventional colours of frequent remote-sensing classes, keyed by normalised name. Classes
# that share a benchmark (ISPRS Potsdam and Vaihingen, LoveDA, OpenEarthMap, the Dubai aerial
# set) have clearly different colours: built-up in reds and greys, roads orange, water blue,
# vegetation in greens and bare ground in browns.
_FIXED_COLORS: Dict[str, RGB] = {
    "building": (220, 20, 60),
    "buildings": (220, 20, 60),
    "road": (255, 140, 0),
    "roads": (255, 140, 0),
    "water": (0, 90, 255),
    "tree": (20, 130, 40),
    "trees": (20, 130, 40),
    "forest": (0, 85, 30),
    "vegetation": (110, 200, 60),
    "low vegetation": (160, 235, 90),
    "grass": (160, 235, 90),
    "rangeland": (170, 220, 120),
    "agriculture": (240, 215, 110),
    "cropland": (240, 215, 110),
    "car": (255, 0, 255),
    "vehicle": (255, 0, 255),
    "impervious surfaces": (190, 190, 190),
    "impervious surface": (190, 190, 190),
    "pavement": (190, 190, 190),
    "developed space": (150, 150, 150),
    "land": (205, 170, 120),
    "barren": (160, 110, 70),
    "bareland": (160, 110, 70),
    "bare land": (160, 110, 70),
    "bare soil": (160, 110, 70),
    "clutter": (128, 0, 128),
    "background": (255, 255, 255),
    "others": (255, 255, 255),
}

# Hues 15 degrees apart, each at three (saturation, value) shades: 72 colours for other names.
_HASH_HUES = 24
_HASH_SHADES = ((0.85, 0.95), (0.55, 0.80), (0.90, 0.55))

# Legend layout, in units of the font size (itself a fraction of the image's short side).
_FONT_FRACTION = 1 / 28
_MIN_FONT_PIXELS = 12
_ROW_HEIGHT = 1.6
_SWATCH_SIDE = 1.1
_PADDING = 0.6
_PANEL_COLOR: RGB = (255, 255, 255)
_TEXT_COLOR: RGB = (0, 0, 0)
_OUTLINE_COLOR: RGB = (64, 64, 64)


def normalize_class_name(name: str) -> str:
    """Lower-case ``name``, read "_" and "-" as spaces and collapse runs of white space."""
    return " ".join(re.sub(r"[_\-]+", " ", name.casefold()).split())


def _shade(index: int) -> RGB:
    hue_index, shade_index = divmod(index, len(_HASH_SHADES))
    saturation, value = _HASH_SHADES[shade_index]
    red, green, blue = colorsys.hsv_to_rgb(hue_index / _HASH_HUES, saturation, value)
    return (round(red * 255), round(green * 255), round(blue * 255))


_HASH_PALETTE: Tuple[RGB, ...] = tuple(_shade(i) for i in range(_HASH_HUES * len(_HASH_SHADES)))


def _hash_index(key: str) -> int:
    # SHA-256 rather than hash(), which Python salts differently in every process.
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % len(_HASH_PALETTE)


def class_color(name: str) -> RGB:
    """Return the RGB colour of a class name, the same on every run and machine.

    Names are compared after ``normalize_class_name``, and a qualifier in brackets is dropped
    for the fixed table ("land (unpaved area)" is drawn as "land").
    """
    key = normalize_class_name(name)
    without_qualifier = " ".join(re.sub(r"\([^)]*\)", " ", key).split())
    for candidate in (key, without_qualifier):
        if candidate in _FIXED_COLORS:
            return _FIXED_COLORS[candidate]
    return _HASH_PALETTE[_hash_index(key)]


def class_palette(class_names: Sequence[str]) -> List[RGB]:
    """Return one colour per class, distinct within any list of names.

    Each class takes ``class_color(name)`` unless an earlier class of the list already has that
    colour. Then it takes the next unused colour of the hashed palette, starting from its own
    hashed position, so a class changes colour only in lists where it would share one. Lists
    longer than that palette (72 colours) continue with colours spread by the golden ratio
    over hue, saturation and value, still distinct but harder to tell apart.
    """
    palette: List[RGB] = []
    used = set()
    extra = 0
    for name in class_names:
        color = class_color(name)
        if color in used:
            start = _hash_index(normalize_class_name(name))
            for step in range(len(_HASH_PALETTE)):
                candidate = _HASH_PALETTE[(start + step) % len(_HASH_PALETTE)]
                if candidate not in used:
                    color = candidate
                    break
        while color in used:
            color = _spread_color(extra)
            extra += 1
        palette.append(color)
        used.add(color)
    return palette


def _spread_color(index: int) -> RGB:
    """Return the ``index``-th colour of a deterministic sequence beyond the hashed palette."""
    golden = 0.6180339887498949
    hue = (index * golden) % 1.0
    saturation = 0.45 + 0.5 * ((index * golden * golden) % 1.0)
    value = 0.55 + 0.4 * ((index * golden * golden * golden) % 1.0)
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(red * 255), round(green * 255), round(blue * 255))


def _as_label_array(label_map: ArrayLike) -> np.ndarray:
    if hasattr(label_map, "detach"):
        label_map = label_map.detach().cpu().numpy()
    labels = np.asarray(label_map)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"label map must be an H x W integer array, got shape {labels.shape} and dtype "
            f"{labels.dtype}"
        )
    return labels.astype(np.int64)


def _class_pixels(labels: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """Return a mask of the pixels that hold a class index, after checking every value."""
    is_class = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
    invalid = ~is_class & (labels != ignore_label)
    if invalid.any():
        values = np.unique(labels[invalid])[:10].tolist()
        raise ValueError(
            f"label map contains invalid value(s) {values}, neither a class index "
            f"(0..{num_classes - 1}) nor the ignore label {ignore_label}"
        )
    return is_class


def colorize(
    label_map: ArrayLike,
    class_names: Sequence[str],
    ignore_label: int = 255,
    ignore_color: RGB = (0, 0, 0),
) -> np.ndarray:
    """Paint a label map with the colours of ``class_palette(class_names)``.

    Args:
        label_map: H x W class indices, or ``ignore_label`` for unlabelled pixels.
        class_names: the N class names the indices refer to.
        ignore_label: the value of unlabelled pixels, painted ``ignore_color``.
        ignore_color: RGB colour of unlabelled pixels.

    Returns:
        H x W x 3 uint8 RGB image.
    """
    labels = _as_label_array(label_map)
    is_class = _class_pixels(labels, len(class_names), ignore_label)
    lookup = np.asarray(class_palette(class_names), dtype=np.uint8).reshape(-1, 3)
    painted = np.empty(labels.shape + (3,), dtype=np.uint8)
    painted[:] = np.asarray(ignore_color, dtype=np.uint8)
    painted[is_class] = lookup[labels[is_class]]
    return painted


def _as_rgb_image(image: ArrayLike) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8, got {pixels.dtype}; scale other data to 0..255 first "
            "(for example with a 2-98 percentile stretch)"
        )
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 RGB or H x W grey, got shape {pixels.shape}")
    return pixels


def _check_same_size(pixels: np.ndarray, labels: np.ndarray) -> None:
    if pixels.shape[:2] != labels.shape:
        raise ValueError(
            f"image size {pixels.shape[0]} x {pixels.shape[1]} differs from label map size "
            f"{labels.shape[0]} x {labels.shape[1]}"
        )


def overlay(
    image: ArrayLike,
    label_map: ArrayLike,
    class_names: Sequence[str],
    alpha: float = 0.5,
    *,
    ignore_label: int = 255,
    label_regions: bool = False,
) -> np.ndarray:
    """Blend the class colours of a label map over an image.

    Args:
        image: H x W x 3 uint8 RGB image (or H x W grey).
        label_map: H x W class indices, or ``ignore_label`` where the image stays uncovered.
        class_names: the N class names the indices refer to.
        alpha: opacity of the colours, from 0 (image only) to 1 (colours only).
        ignore_label: the value of unlabelled pixels.
        label_regions: also write each class name on its larger regions, with outlines, through
            Detectron2's ``Visualizer.draw_sem_seg`` (slower: it draws with matplotlib).

    Returns:
        H x W x 3 uint8 RGB image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    pixels = _as_rgb_image(image)
    labels = _as_label_array(label_map)
    _check_same_size(pixels, labels)
    is_class = _class_pixels(labels, len(class_names), ignore_label)

    if label_regions:
        from detectron2.data import Metadata
        from detectron2.utils.visualizer import Visualizer

        # Visualizer skips values of N and above, so unlabelled pixels are moved there.
        shown = np.where(is_class, labels, len(class_names))
        metadata = Metadata(
            stuff_classes=list(class_names), stuff_colors=class_palette(class_names)
        )
        drawing = Visualizer(pixels, metadata=metadata).draw_sem_seg(shown, alpha=alpha)
        return drawing.get_image()

    colors = colorize(labels, class_names, ignore_label).astype(np.float32)
    blended = pixels.astype(np.float32)
    blended[is_class] = (1.0 - alpha) * blended[is_class] + alpha * colors[is_class]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def legend_entries(
    label_map: ArrayLike, class_names: Sequence[str], ignore_label: int = 255
) -> List[Tuple[str, RGB]]:
    """Return (name, colour) of every class present in the label map, in class order."""
    labels = _as_label_array(label_map)
    is_class = _class_pixels(labels, len(class_names), ignore_label)
    palette = class_palette(class_names)
    present = np.unique(labels[is_class])
    return [(class_names[index], palette[index]) for index in present.tolist()]


def _legend_grid(
    count: int, entry_size: Tuple[int, int], image_size: Tuple[int, int], position: str
) -> Tuple[int, int]:
    """Return (columns, rows) of a legend that fits beside or below an image where it can.

    Args:
        count: number of entries.
        entry_size: (width, height) of one entry, spacing included.
        image_size: (width, height) of the image inside the padding.
        position: "right" fills columns as high as the image, "bottom" rows as wide as it.
    """
    entry_width, entry_height = entry_size
    if position == "right":
        rows = min(count, max(1, image_size[1] // entry_height))
        return math.ceil(count / rows), rows
    columns = min(count, max(1, image_size[0] // entry_width))
    return columns, math.ceil(count / columns)


def add_legend(
    image: ArrayLike,
    class_names_present: Sequence[str],
    colors: Sequence[RGB],
    *,
    position: str = "right",
) -> np.ndarray:
    """Add a legend panel with one colour swatch and name per class beside or below an image.

    The font size is a fixed fraction of the image's short side (at least 12 pixels), so the
    legend reads the same at any image size. The panel wraps into several columns (right) or
    rows (bottom) when the entries do not fit along the image.

    Args:
        image: H x W x 3 uint8 RGB image (or H x W grey).
        class_names_present: the names to list, usually from ``legend_entries``.
        colors: their RGB colours, one per name.
        position: "right" or "bottom".

    Returns:
        uint8 RGB image larger than ``image`` that contains it at the top left, or a copy of
        ``image`` when there is no name to list.
    """
    pixels = _as_rgb_image(image)
    if len(class_names_present) != len(colors):
        raise ValueError(f"got {len(class_names_present)} class names but {len(colors)} colours")
    if position not in ("right", "bottom"):
        raise ValueError(f"position must be 'right' or 'bottom', got {position!r}")
    if not class_names_present:
        return pixels.copy()

    # Measure one entry, in pixels scaled to the image.
    height, width = pixels.shape[:2]
    font_pixels = max(_MIN_FONT_PIXELS, round(min(height, width) * _FONT_FRACTION))
    font = ImageFont.load_default(size=font_pixels)
    padding = math.ceil(font_pixels * _PADDING)
    swatch = math.ceil(font_pixels * _SWATCH_SIDE)
    row_height = math.ceil(font_pixels * _ROW_HEIGHT)
    text_width = max(font.getbbox(name)[2] for name in class_names_present)
    entry_width = swatch + padding + text_width + padding
    columns, rows = _legend_grid(
        len(class_names_present),
        (entry_width, row_height),
        (width - 2 * padding, height - 2 * padding),
        position,
    )

    # Lay out the canvas: the image at the top left, the panel to its right or below it.
    panel_width = 2 * padding + columns * entry_width - padding
    panel_height = 2 * padding + rows * row_height
    if position == "right":
        canvas_size = (width + panel_width, max(height, panel_height))
        origin = (width, 0)
    else:
        canvas_size = (max(width, panel_width), height + panel_height)
        origin = (0, height)
    canvas = Image.new("RGB", canvas_size, _PANEL_COLOR)
    canvas.paste(Image.fromarray(pixels), (0, 0))

    # Draw the entries, down the columns (right) or along the rows (bottom).
    draw = ImageDraw.Draw(canvas)
    outline = max(1, font_pixels // 12)
    # Centre every name by the same reference box, so that names without ascenders or
    # descenders sit on the same baseline as the others.
    reference_box = font.getbbox("Ag")
    text_offset = (reference_box[1] + reference_box[3]) // 2
    for index, (name, color) in enumerate(zip(class_names_present, colors)):
        if position == "right":
            column, row = divmod(index, rows)
        else:
            row, column = divmod(index, columns)
        left = origin[0] + padding + column * entry_width
        center = origin[1] + padding + row * row_height + row_height // 2
        top = center - swatch // 2
        draw.rectangle(
            (left, top, left + swatch - 1, top + swatch - 1),
            fill=tuple(int(c) for c in color),
            outline=_OUTLINE_COLOR,
            width=outline,
        )
        draw.text(
            (left + swatch + padding, center - text_offset), name, fill=_TEXT_COLOR, font=font
        )
    return np.asarray(canvas)


def draw_segmentation(
    image: ArrayLike,
    label_map: ArrayLike,
    class_names: Sequence[str],
    *,
    alpha: float = 0.5,
    ignore_label: int = 255,
    legend_position: str = "right",
    label_regions: bool = False,
) -> np.ndarray:
    """Overlay a label map on an image and add a legend of the classes it contains.

    Args:
        image, label_map, class_names, alpha, ignore_label, label_regions: as in ``overlay``.
        legend_position: "right" or "bottom", as in ``add_legend``.

    Returns:
        uint8 RGB image: the overlay with its legend panel.
    """
    blended = overlay(
        image, label_map, class_names, alpha, ignore_label=ignore_label, label_regions=label_regions
    )
    entries = legend_entries(label_map, class_names, ignore_label)
    names = [name for name, _ in entries]
    colors = [color for _, color in entries]
    return add_legend(blended, names, colors, position=legend_position)
