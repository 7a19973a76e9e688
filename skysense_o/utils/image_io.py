"""Read remote-sensing images and label masks into NumPy arrays with fixed, documented rules.

Ordinary formats (PNG, JPEG, BMP, WebP, ...) are read with Pillow, TIFF and GeoTIFF with
rasterio. Every reader checks the image size from the file header against ``max_pixels``
before any pixel is decoded, so a small file that declares a huge image (a decompression
bomb) is rejected cheaply.

Conversion rules of :func:`read_image`, applied in this order:

1. A palette image is expanded through its palette. CMYK, YCbCr, LAB and HSV images are
   converted to RGB by Pillow.
2. An alpha band is dropped (never composited), so transparent pixels keep their colour.
3. A single-band image (not counting alpha) is replicated to three identical channels, and
   ``bands`` is not used.
4. An image with two or more bands is reduced to the three bands named by ``bands``
   (0-based), so a 4-band R, G, B, NIR GeoTIFF gives R, G, B with the default (0, 1, 2).
5. Data that is not 8-bit (16-bit, 32-bit, float) is stretched to 0..255 with one shared range
   for the selected bands. ``lo`` and ``hi`` are the 2nd and 98th percentiles (NumPy's linear
   method) of every valid value of those bands. A value ``x`` becomes
   ``rint(clip((x - lo) / (hi - lo), 0, 1) * 255)``. Valid means finite and not the file's
   nodata value. When ``hi == lo`` the minimum and maximum replace them, and a constant image
   becomes 0. Invalid pixels become 0. The arithmetic is float32 (exact for 16-bit data), and
   one shared range keeps the colour balance between bands.
   The stretch depends on each image's own values, so neighbouring tiles of a mosaic may come
   out with different brightness.

EXIF orientation tags are not applied: label masks are aligned with the pixel grid as stored,
and rotating the image alone would move it away from its label. A tag asking for a rotation is
reported once per process with a warning.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# The default of the INPUT.MAX_IMAGE_PIXELS config key. It equals the size at which Pillow
# itself raises DecompressionBombError (twice its Image.MAX_IMAGE_PIXELS of 89,478,485).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# Files with these suffixes are read with rasterio, which keeps GeoTIFF georeferencing and
# reads any band count and data type.
RASTERIO_SUFFIXES = (".tif", ".tiff")

# The tool that turns colour-coded label images into the single-channel index PNGs read here.
RGB_LABEL_TOOL = "tools/convert_rgb_labels.py"

STRETCH_PERCENTILES = (2.0, 98.0)

# Pillow modes whose pixels are numbers wider than 8 bits (single band).
_NUMERIC_PIL_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
# Pillow modes converted to RGB by Pillow before the band rules apply.
_CONVERTED_PIL_MODES = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
# Pillow's decoders signal truncated or corrupt data with these exceptions.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, zlib.error)
_EXIF_ORIENTATION_TAG = 0x0112

# Serialises the short moments in which Pillow's own size limit is lifted (see _open_pil).
_PIL_LIMIT_LOCK = threading.Lock()
_warned_exif_orientation = False


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")


def _check_pixels(path: Path, width: int, height: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{path} is {width} x {height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (config key INPUT.MAX_IMAGE_PIXELS). Raise the limit if the file "
            "is trusted, or tile the image first."
        )


def _open_pil(path: Path, max_pixels: Optional[int]) -> Image.Image:
    """Open ``path`` lazily with Pillow (header only) and apply the ``max_pixels`` guard."""
    # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that. This module applies
    # its own limit, so Pillow's is lifted while the header is parsed, under a lock, and
    # restored at once, then the size is checked here before any pixel is decoded.
    try:
        with _PIL_LIMIT_LOCK:
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                pil_image = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except UnidentifiedImageError as e:
        raise ValueError(f"{path} is not an image file that Pillow can read: {e}") from e
    except _DECODE_ERRORS as e:
        raise ValueError(f"Failed to read the header of {path}: {e}") from e
    try:
        _check_pixels(path, pil_image.width, pil_image.height, max_pixels)
    except ValueError:
        pil_image.close()
        raise
    return pil_image


def _warn_exif_orientation(path: Path, pil_image: Image.Image) -> None:
    global _warned_exif_orientation
    if _warned_exif_orientation:
        return
    try:
        orientation = pil_image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:
        return
    if orientation not in (None, 1):
        _warned_exif_orientation = True
        logger.warning(
            "%s has EXIF orientation %s; it is ignored so that the image stays aligned with "
            "its label (reported once per process).",
            path,
            orientation,
        )


def _decode_pil(path: Path, pil_image: Image.Image) -> np.ndarray:
    """Decode every pixel of an opened Pillow image; H x W or H x W x C array."""
    try:
        pil_image.load()
        return np.array(pil_image)
    except _DECODE_ERRORS as e:
        raise ValueError(f"{path} is truncated or corrupt and cannot be decoded: {e}") from e


def _stretch_to_uint8(data: np.ndarray, nodata: Optional[float]) -> np.ndarray:
    """Stretch H x W x C numbers to uint8 with one percentile range (module docstring, rule 5)."""
    # float32 halves the memory of float64 on large multi-band scenes.
    values = data.astype(np.float32)
    valid = np.isfinite(values)
    if nodata is not None:
        valid &= values != nodata
    if not valid.any():
        return np.zeros(data.shape, dtype=np.uint8)

    valid_values = values[valid]
    low, high = (np.float32(v) for v in np.percentile(valid_values, STRETCH_PERCENTILES))
    if high <= low:
        low, high = valid_values.min(), valid_values.max()
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)

    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * np.float32(255.0)
    scaled[~valid] = 0.0
    return np.rint(scaled).astype(np.uint8)


def _select_bands(
    path: Path, data: np.ndarray, bands: Sequence[int], alpha_index: Optional[int]
) -> np.ndarray:
    """Reduce an H x W x C array to H x W x 3 following rules 2 to 4 of the module docstring."""
    if data.ndim == 2:
        data = data[:, :, None]
    colour_bands = [i for i in range(data.shape[2]) if i != alpha_index]
    if len(colour_bands) == 1:
        return np.repeat(data[:, :, colour_bands[0] : colour_bands[0] + 1], 3, axis=2)

    bands = tuple(int(b) for b in bands)
    if len(bands) != 3 or any(b < 0 or b >= data.shape[2] for b in bands):
        raise ValueError(
            f"{path} has {data.shape[2]} bands (0-based indices 0..{data.shape[2] - 1}); "
            f"the requested bands {list(bands)} (config key INPUT.BANDS) must be three of them."
        )
    return data[:, :, list(bands)]


def _pil_to_array(path: Path, pil_image: Image.Image) -> Tuple[np.ndarray, Optional[int]]:
    """Decode a Pillow image; returns the H x W (x C) array and the index of its alpha band."""
    mode = pil_image.mode
    if mode == "P":
        pil_image = pil_image.convert("RGBA" if "transparency" in pil_image.info else "RGB")
    elif mode == "PA":
        pil_image = pil_image.convert("RGBA")
    elif mode in _CONVERTED_PIL_MODES:
        pil_image = pil_image.convert("RGB")
    elif mode == "1":
        pil_image = pil_image.convert("L")
    data = _decode_pil(path, pil_image)
    alpha_index = pil_image.mode.find("A") if "A" in pil_image.mode else None
    return data, alpha_index


def read_image(
    path: PathLike,
    *,
    bands: Sequence[int] = (0, 1, 2),
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Read an image file as an RGB uint8 array, following the rules of the module docstring.

    Args:
        path: image file. ``.tif``/``.tiff`` files are read with rasterio, others with Pillow.
        bands: the three 0-based band indices used as R, G, B for images with two or more
            bands (config key INPUT.BANDS).
        max_pixels: largest accepted width x height (config key INPUT.MAX_IMAGE_PIXELS);
            ``None`` disables the check.

    Returns:
        H x W x 3 uint8 array, RGB.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image, is truncated or corrupt, is larger than
            ``max_pixels``, or lacks one of ``bands``.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in RASTERIO_SUFFIXES:
        return read_geotiff(path, bands=bands, max_pixels=max_pixels)[0]

    pil_image = _open_pil(path, max_pixels)
    with pil_image:
        _warn_exif_orientation(path, pil_image)
        data, alpha_index = _pil_to_array(path, pil_image)
    if data.dtype != np.uint8:
        data = _stretch_to_uint8(data, nodata=None)
    return np.ascontiguousarray(_select_bands(path, data, bands, alpha_index))


def _open_rasterio(path: Path):
    """Open ``path`` with rasterio, imported here so that only TIFF users need it."""
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs rasterio; install it with 'pip install rasterio'."
        ) from e
    try:
        with warnings.catch_warnings():
            # Plain (not georeferenced) TIFFs are normal input, so rasterio's warning about
            # them is silenced.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as e:
        raise ValueError(f"{path} is not a TIFF file that rasterio can read: {e}") from e


def _read_rasterio_bands(path: Path, dataset, indexes: Sequence[int]) -> np.ndarray:
    """Read 1-based band ``indexes`` of an open rasterio dataset; H x W x len(indexes)."""
    from rasterio.errors import RasterioError

    try:
        data = dataset.read(indexes=list(indexes))
    except RasterioError as e:
        raise ValueError(f"{path} is truncated or corrupt and cannot be decoded: {e}") from e
    return np.moveaxis(data, 0, -1)


def _rasterio_image(path: Path, dataset, bands: Sequence[int]) -> np.ndarray:
    """Read the bands of an open rasterio dataset as H x W x 3 uint8 (module rules 1 to 5)."""
    from rasterio.enums import ColorInterp

    colour_bands = [
        i for i, interp in enumerate(dataset.colorinterp) if interp != ColorInterp.alpha
    ]
    if len(colour_bands) == 1 and dataset.colorinterp[colour_bands[0]] == ColorInterp.palette:
        indices = _read_rasterio_bands(path, dataset, [colour_bands[0] + 1])[:, :, 0]
        lut = np.zeros((max(int(indices.max()) + 1, 256), 3), dtype=np.uint8)
        for value, rgba in dataset.colormap(colour_bands[0] + 1).items():
            lut[value] = rgba[:3]
        return lut[indices]

    if len(colour_bands) == 1:
        selected = [colour_bands[0]]
    else:
        # Validate the requested bands on an empty array of the right band count, so the
        # error is the same as for Pillow images and no pixels are read first.
        _select_bands(path, np.empty((0, 0, dataset.count)), bands, alpha_index=None)
        selected = [int(b) for b in bands]
    data = _read_rasterio_bands(path, dataset, [b + 1 for b in selected])
    if data.dtype != np.uint8:
        data = _stretch_to_uint8(data, nodata=dataset.nodata)
    if data.shape[2] == 1:
        data = np.repeat(data, 3, axis=2)
    return np.ascontiguousarray(data)


def read_geotiff(
    path: PathLike,
    bands: Sequence[int] = (0, 1, 2),
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Read a (Geo)TIFF as an RGB uint8 array together with its rasterio profile.

    Args:
        path: a TIFF or GeoTIFF file, any band count and data type.
        bands: as in :func:`read_image`.
        max_pixels: as in :func:`read_image`.

    Returns:
        ``(image, profile)``: the H x W x 3 uint8 RGB array and the file's rasterio profile
        as a dict (``crs``, ``transform``, ``width``, ``height``, ``count``, ``dtype``,
        ``nodata``, ...), so that a label map can be written back with the same
        georeferencing. ``crs`` is None for a TIFF without georeferencing.

    Raises:
        FileNotFoundError, ValueError: as in :func:`read_image`.
    """
    path = Path(path)
    _check_exists(path)
    with _open_rasterio(path) as dataset:
        _check_pixels(path, dataset.width, dataset.height, max_pixels)
        image = _rasterio_image(path, dataset, bands)
        profile = dict(dataset.profile)
    return image, profile


def read_image_size(path: PathLike) -> Tuple[int, int]:
    """Read the ``(width, height)`` of an image or label file from its header only.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in RASTERIO_SUFFIXES:
        with _open_rasterio(path) as dataset:
            return dataset.width, dataset.height
    with _open_pil(path, max_pixels=None) as pil_image:
        return pil_image.width, pil_image.height


def _label_from_colour(path: Path, data: np.ndarray) -> np.ndarray:
    """Accept a 3- or 4-channel label only when its colour channels are equal (grey)."""
    colour = data[:, :, :3]
    if np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(
        colour[:, :, 0], colour[:, :, 2]
    ):
        return np.ascontiguousarray(colour[:, :, 0])
    raise ValueError(
        f"{path} is a colour (RGB) label image; labels must be single-channel index images "
        f"where each pixel holds a class index. Convert it with {RGB_LABEL_TOOL}."
    )


def read_label(
    path: PathLike, *, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Read a single-channel label image (class indices) without changing any value.

    Palette ("P") PNGs give their palette indices, 16-bit PNGs and TIFFs keep their values. A
    3- or 4-channel file whose colour channels are all equal is read as its first channel.

    Args:
        path: label image (PNG, TIFF, ...).
        max_pixels: as in :func:`read_image`.

    Returns:
        H x W integer array (uint8, uint16 or int32, as stored).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, truncated, too large, or a colour label.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in RASTERIO_SUFFIXES:
        with _open_rasterio(path) as dataset:
            _check_pixels(path, dataset.width, dataset.height, max_pixels)
            data = _read_rasterio_bands(path, dataset, range(1, dataset.count + 1))
    else:
        pil_image = _open_pil(path, max_pixels)
        with pil_image:
            if pil_image.mode == "1":
                pil_image = pil_image.convert("L")
            data = _decode_pil(path, pil_image)
    if data.ndim == 3 and data.shape[2] <= 2:
        # One band, or grey with alpha ("LA"): the first band contains the class indices.
        data = data[:, :, 0]
    if data.ndim == 3:
        data = _label_from_colour(path, data)
    if not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"{path} contains {data.dtype} values; a label must contain integers.")
    return data
