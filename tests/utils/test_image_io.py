"""Tests of image and label reading: conversions, GeoTIFF profiles and bad files."""

import logging
import struct
import warnings
import zlib

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from skysense_o.utils import image_io
from skysense_o.utils.image_io import read_geotiff, read_image, read_image_size, read_label


def write_tiff(path, bands: np.ndarray, **profile) -> None:
    """Write C x H x W ``bands`` as a TIFF with rasterio."""
    count, height, width = bands.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            height=height,
            width=width,
            count=count,
            dtype=bands.dtype,
            **profile,
        ) as dst:
            dst.write(bands)


def expected_stretch(values: np.ndarray) -> np.ndarray:
    """The documented rule: 2nd..98th percentile of all values mapped to 0..255."""
    values = values.astype(np.float32)
    low, high = (np.float32(v) for v in np.percentile(values, [2, 98]))
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * np.float32(255)).astype(np.uint8)


def test_rgb_png_exact(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.dtype == np.uint8
    assert np.array_equal(image, data)


def test_grayscale_replicated(tmp_path):
    data = np.arange(35, dtype=np.uint8).reshape(5, 7)
    Image.fromarray(data, mode="L").save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (5, 7, 3)
    for channel in range(3):
        assert np.array_equal(image[:, :, channel], data)


def test_palette_converted(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    pil_image = Image.fromarray(indices, mode="P")
    pil_image.putpalette([10, 20, 30, 200, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pil_image.save(tmp_path / "palette.png")
    image = read_image(tmp_path / "palette.png")
    assert image[0, 0].tolist() == [10, 20, 30]
    assert image[0, 1].tolist() == [200, 0, 0]
    assert image[1, 0].tolist() == [0, 255, 0]


def test_alpha_dropped(tmp_path):
    data = np.zeros((3, 4, 4), dtype=np.uint8)
    data[..., :3] = [12, 34, 56]
    data[..., 3] = 0
    Image.fromarray(data, mode="RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.shape == (3, 4, 3)
    assert np.all(image == [12, 34, 56])


def test_grey_with_alpha_replicated(tmp_path):
    data = np.stack([np.full((2, 2), 77, np.uint8), np.zeros((2, 2), np.uint8)], axis=-1)
    Image.fromarray(data, mode="LA").save(tmp_path / "la.png")
    assert np.all(read_image(tmp_path / "la.png") == 77)


def test_16bit_png_stretched(tmp_path):
    data = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 500).astype(np.uint16)
    Image.fromarray(data).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    expected = expected_stretch(data)
    assert np.array_equal(image[:, :, 0], expected)
    assert np.array_equal(image[:, :, 2], expected)
    assert image[0, 0, 0] == 0
    assert image[9, 9, 0] == 255


def test_constant_16bit_becomes_zero(tmp_path):
    Image.fromarray(np.full((4, 4), 1234, np.uint16)).save(tmp_path / "flat.png")
    assert np.all(read_image(tmp_path / "flat.png") == 0)


def test_four_band_tiff_bands(tmp_path):
    bands = np.stack([np.full((6, 5), value, np.uint8) for value in (10, 20, 30, 40)])
    write_tiff(tmp_path / "rgbn.tif", bands)
    assert read_image(tmp_path / "rgbn.tif")[0, 0].tolist() == [10, 20, 30]
    assert read_image(tmp_path / "rgbn.tif", bands=(3, 2, 1))[0, 0].tolist() == [40, 30, 20]
    with pytest.raises(ValueError, match=r"INPUT.BANDS") as info:
        read_image(tmp_path / "rgbn.tif", bands=(0, 1, 4))
    assert "4 bands" in str(info.value)


def test_uint16_geotiff_profile(tmp_path):
    rng = np.random.default_rng(1)
    bands = rng.integers(0, 4096, (4, 8, 12), dtype=np.uint16)
    transform = Affine(0.5, 0.0, 346000.0, 0.0, -0.5, 5648000.0)
    write_tiff(tmp_path / "geo.tif", bands, crs="EPSG:25832", transform=transform)
    image, profile = read_geotiff(tmp_path / "geo.tif")
    assert image.shape == (8, 12, 3)
    assert profile["crs"].to_epsg() == 25832
    assert profile["transform"] == transform
    assert profile["count"] == 4
    expected = expected_stretch(np.moveaxis(bands[:3], 0, -1))
    assert np.array_equal(image, expected)


def test_nodata_excluded_from_stretch(tmp_path):
    band = np.array([[0, 100, 200], [300, 400, 0]], dtype=np.uint16)
    write_tiff(tmp_path / "nodata.tif", band[None], nodata=0)
    image = read_image(tmp_path / "nodata.tif")
    assert image[0, 0, 0] == 0
    assert image[1, 2, 0] == 0
    valid = band[band != 0].astype(np.float32)
    low, high = np.percentile(valid, [2, 98])
    assert image[1, 1, 0] == np.rint(np.clip((400 - low) / (high - low), 0, 1) * 255)


def test_demo_geotiff(samples_dir):
    image, profile = read_geotiff(samples_dir / "demo" / "oem_koeln_50.tif")
    assert image.shape == (1000, 1000, 3)
    assert image.dtype == np.uint8
    assert profile["crs"].to_epsg() == 25832
    assert profile["transform"].a == 0.5


def test_sample_jpeg_size(samples_dir):
    path = samples_dir / "dubai_aerial" / "images" / "dubai_t1_009.jpg"
    assert read_image(path).shape == (644, 797, 3)
    assert read_image_size(path) == (797, 644)


@pytest.mark.parametrize("suffix,kwargs", [(".jpg", {"quality": 90}), (".png", {})])
def test_truncated_file_names_file(tmp_path, suffix, kwargs):
    data = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(data).save(path, **kwargs)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=f"cut{suffix}"):
        read_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        read_image(path)


def write_png_with_declared_size(path, width: int, height: int) -> None:
    """Write a tiny PNG, then rewrite its header to declare ``width`` x ``height``."""
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(path)
    content = bytearray(path.read_bytes())
    content[16:24] = struct.pack(">II", width, height)
    content[29:33] = struct.pack(">I", zlib.crc32(bytes(content[12:29])))
    path.write_bytes(bytes(content))


def test_too_many_pixels_checked_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    write_png_with_declared_size(path, 30000, 30000)
    with pytest.raises(ValueError, match="INPUT.MAX_IMAGE_PIXELS") as info:
        read_image(path)
    message = str(info.value)
    assert "bomb.png" in message
    assert "30000 x 30000" in message


def test_max_pixels_limit(tmp_path):
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="100 pixels"):
        read_image(tmp_path / "small.png", max_pixels=99)
    assert read_image(tmp_path / "small.png", max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(ValueError, match="INPUT.MAX_IMAGE_PIXELS"):
        read_label(tmp_path / "small.png", max_pixels=50)


def test_pillow_limit_restored(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "x.png")
    read_image(tmp_path / "x.png")
    assert Image.MAX_IMAGE_PIXELS == limit


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_label(tmp_path / "absent.png")


def test_exif_orientation_ignored(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(image_io, "_warned_exif_orientation", False)
    data = np.zeros((4, 8, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(data).save(tmp_path / "rotated.jpg", exif=exif)
    with caplog.at_level(logging.WARNING, logger="skysense_o.utils.image_io"):
        image = read_image(tmp_path / "rotated.jpg")
        read_image(tmp_path / "rotated.jpg")
    assert image.shape == (4, 8, 3)
    assert caplog.text.count("EXIF orientation 6") == 1


def test_label_values_kept(tmp_path):
    data = np.array([[0, 1, 255], [4, 2, 3]], dtype=np.uint8)
    Image.fromarray(data, mode="L").save(tmp_path / "label.png")
    assert np.array_equal(read_label(tmp_path / "label.png"), data)

    pil_image = Image.fromarray(data, mode="P")
    pil_image.putpalette(list(range(256)) * 3)
    pil_image.save(tmp_path / "palette_label.png")
    assert np.array_equal(read_label(tmp_path / "palette_label.png"), data)


def test_label_16bit_kept(tmp_path):
    data = np.array([[0, 300], [65535, 7]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "label16.png")
    label = read_label(tmp_path / "label16.png")
    assert label.dtype == np.uint16
    assert np.array_equal(label, data)


def test_label_tiff(tmp_path):
    data = np.array([[1, 2], [3, 255]], dtype=np.uint8)
    write_tiff(tmp_path / "label.tif", data[None])
    assert np.array_equal(read_label(tmp_path / "label.tif"), data)


def test_colour_label_rejected(tmp_path):
    data = np.zeros((2, 2, 3), np.uint8)
    data[0, 0] = [255, 0, 0]
    Image.fromarray(data).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour") as info:
        read_label(tmp_path / "colour.png")
    assert image_io.RGB_LABEL_TOOL in str(info.value)
    assert "colour.png" in str(info.value)


def test_grey_rgb_label_accepted(tmp_path):
    data = np.repeat(np.array([[0, 1], [2, 255]], np.uint8)[:, :, None], 3, axis=2)
    Image.fromarray(data).save(tmp_path / "grey_rgb.png")
    assert read_label(tmp_path / "grey_rgb.png").tolist() == [[0, 1], [2, 255]]


def test_float_label_rejected(tmp_path):
    write_tiff(tmp_path / "float.tif", np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="float32"):
        read_label(tmp_path / "float.tif")
