import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pneumonia.data import image_io
from pneumonia.data.image_io import (
    ImageTooLargeError,
    ImageTooSmallError,
    NotRegularFileError,
    load_grayscale,
)


@pytest.mark.parametrize("size", [32, 128, 224])
def test_real_resized_jpeg(data_root, size):
    path = next((data_root / "train" / "NORMAL").iterdir())
    pixels = load_grayscale(path, size)
    assert pixels.shape == (size, size)
    assert pixels.dtype == np.uint8
    assert 20 < pixels.mean() < 235  # an X-ray, not a blank


def test_full_size_originals_rgb_included(originals_root):
    paths = sorted(originals_root.rglob("*.jpeg"))
    modes = {Image.open(p).mode for p in paths}
    assert "RGB" in modes  # the originals carry RGB JPEGs; they must load like the rest
    for path in paths:
        pixels = load_grayscale(path, 128)
        assert pixels.shape == (128, 128) and pixels.dtype == np.uint8
        assert pixels.std() > 5


def test_rgb_equals_its_grayscale_conversion(tmp_path):
    rng = np.random.default_rng(0)
    channels = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)  # three different channels
    Image.fromarray(channels).save(tmp_path / "rgb.png")
    # ITU-R 601 luma, as PIL converts (not one channel, not the plain mean)
    luma = channels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gray = np.asarray(Image.fromarray(channels).convert("L"))
    assert np.abs(gray - luma).max() <= 1 and np.abs(gray - channels.mean(axis=-1)).max() > 10
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(
        load_grayscale(tmp_path / "rgb.png", 64), load_grayscale(tmp_path / "gray.png", 64)
    )


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit detector values
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    pixels = load_grayscale(tmp_path / "wide.png", 64)
    assert pixels.min() == 0 and pixels.max() >= 250
    assert len(np.unique(pixels)) > 200  # convert("L") would clip almost everything to 255


def test_one_hot_pixel_does_not_squeeze_a_16_bit_xray_into_a_few_grey_levels(tmp_path):
    ramp = np.linspace(0, 4095, 256 * 256).reshape(256, 256).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "clean.png")
    ramp[10, 10] = 65535  # a dead detector pixel at full scale
    Image.fromarray(ramp).save(tmp_path / "hot.png")
    clean, hot = (load_grayscale(tmp_path / name, 64) for name in ("clean.png", "hot.png"))
    difference = np.abs(hot.astype(int) - clean.astype(int))
    difference[:5, :5] = 0  # around the hot pixel itself, which shows bright, as it should
    assert difference.max() <= 1
    assert hot.mean() == pytest.approx(127.5, abs=3)


def test_a_16_bit_image_of_nearly_one_value_keeps_what_differs(tmp_path):
    flat = np.full((256, 256), 1000, dtype=np.uint16)
    flat[100:104, 100:104] = 3000  # 16 of 65,536 pixels: under the 0.1% the stretch cuts
    Image.fromarray(flat).save(tmp_path / "flat.png")
    assert load_grayscale(tmp_path / "flat.png", 256).max() == 255


def test_corrupt_file_raises_oserror(tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(OSError):
        load_grayscale(broken, 64)


# --- odd files: size limits, transparency, things that are not regular files ---------------------


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` but which holds (almost) no pixel data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (30000, 30000),  # PIL's DecompressionBombError (not an OSError)
        (10000, 10000),  # PIL's DecompressionBombWarning
        (7000, 7000),  # only this project's MAX_PIXELS
    ],
)
def test_huge_image_is_rejected_from_its_header(tmp_path, width, height):
    bomb = _png_header_only(tmp_path / "bomb.png", width, height)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Decoding would fail with "truncated" (an OSError); a size error proves only the header was read.
        with pytest.raises(ImageTooLargeError, match=r"bomb\.png"):
            load_grayscale(bomb, 64)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert issubclass(ImageTooLargeError, ValueError)  # callers catch OSError and ValueError


def test_pixel_limit_applies_to_real_images(data_root, monkeypatch):
    path = next((data_root / "train" / "NORMAL").iterdir())  # 224 x 224
    assert image_io.MAX_PIXELS > 2900 * 2900  # the largest Kaggle originals fit
    monkeypatch.setattr(image_io, "MAX_PIXELS", 224 * 224 - 1)
    with pytest.raises(ImageTooLargeError, match=r"224x224 pixels, over the limit"):
        load_grayscale(path, 64)
    monkeypatch.setattr(image_io, "MAX_PIXELS", 224 * 224)
    assert load_grayscale(path, 64).shape == (64, 64)


@pytest.mark.parametrize(("width", "height"), [(1, 1), (10, 10), (31, 400)])
def test_tiny_image_is_not_an_xray(tmp_path, width, height):
    path = tmp_path / "tiny.png"
    Image.new("L", (width, height), 128).save(path)
    with pytest.raises(
        ImageTooSmallError, match=rf"tiny\.png is {width}x{height} pixels.*at least 32"
    ):
        load_grayscale(path, 64)


def test_smallest_accepted_image(tmp_path):
    path = tmp_path / "narrow.png"
    Image.new("L", (32, 400), 128).save(path)
    assert load_grayscale(path, 64).shape == (64, 64)


def _real_gray(data_root):
    return np.asarray(Image.open(sorted((data_root / "train" / "PNEUMONIA").iterdir())[0]))


def _composited_over_black(gray, alpha, tmp_path):
    expected = np.round(gray.astype(np.float32) * (alpha.astype(np.float32) / 255)).astype(np.uint8)
    Image.fromarray(expected).save(tmp_path / "expected.png")
    return load_grayscale(tmp_path / "expected.png", 128)


def test_rgba_xray_is_composited_over_black(data_root, tmp_path):
    gray = _real_gray(data_root)
    height, width = gray.shape
    # Opaque on the left, fading to transparent on the right; transparent pixels store white, which
    # must not show through (dropping the alpha band would keep it).
    alpha = np.tile(np.clip(np.linspace(512, -128, width), 0, 255), (height, 1)).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    rgb[alpha == 0] = 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "xray_rgba.png")
    pixels = load_grayscale(tmp_path / "xray_rgba.png", 128)
    np.testing.assert_array_equal(pixels, _composited_over_black(gray, alpha, tmp_path))
    assert pixels[:, -10:].max() == 0  # the transparent side is black, not white
    assert pixels[:, :40].mean() > 20  # the opaque side is the X-ray


def test_la_and_palette_transparency_are_composited_over_black(data_root, tmp_path):
    gray = _real_gray(data_root)
    alpha = np.full(gray.shape, 255, dtype=np.uint8)
    alpha[:, gray.shape[1] // 2 :] = 0
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(
        load_grayscale(tmp_path / "la.png", 128), _composited_over_black(gray, alpha, tmp_path)
    )
    # A palette image whose index 0 is transparent: the right half points at it.
    indices = (gray // 2 + 1).astype(np.uint8)
    indices[:, gray.shape[1] // 2 :] = 0
    palette = Image.fromarray(indices, "P")
    palette.putpalette([255, 255, 255] + [min(2 * i, 255) for i in range(255) for _ in range(3)])
    palette.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a transparent palette is not handled
        pixels = load_grayscale(tmp_path / "p.png", 128)
    assert pixels[:, -60:].max() == 0 and pixels[:, :40].mean() > 20


def test_dangling_and_looping_links_name_the_problem(tmp_path):
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop_a.png").symlink_to(tmp_path / "loop_b.png")
    (tmp_path / "loop_b.png").symlink_to(tmp_path / "loop_a.png")
    with pytest.raises(FileNotFoundError, match=r"dangling symbolic link.*gone\.png"):
        load_grayscale(tmp_path / "dangling.png", 64)
    with pytest.raises(OSError, match=r"symbolic link loop.*loop_a\.png"):
        load_grayscale(tmp_path / "loop_a.png", 64)


def test_folder_and_device_are_refused_without_reading(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(NotRegularFileError, match=r"folder\.png is a folder"):
        load_grayscale(tmp_path / "folder.png", 64)
    with pytest.raises(NotRegularFileError, match="character device"):
        load_grayscale("/dev/zero", 64)  # reading it would never end


def test_16_bit_transparent_pixels_neither_stretch_the_range_nor_show(tmp_path):
    ramp = np.linspace(1000, 2000, 64 * 64).reshape(64, 64).astype(np.uint16)
    ramp[:, 48:] = 65535  # "transparent" padding far outside the image's range
    Image.fromarray(ramp).save(tmp_path / "wide.png", transparency=65535)
    pixels = load_grayscale(tmp_path / "wide.png", 64)
    assert pixels[:, 49:].max() == 0  # composited over black
    assert pixels[:, :47].max() >= 250  # stretched over the opaque 1000..2000, not 1000..65535


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_an_exif_orientation_is_shown_upright_as_viewers_show_it(data_root, tmp_path, orientation, suffix):  # fmt: skip
    from PIL import ImageOps

    xray = Image.open(next((data_root / "train" / "PNEUMONIA").iterdir())).convert("L")
    xray = xray.crop((0, 0, 200, 150))  # not square: a swapped width and height would show
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"tagged{suffix}"
    # Stored turned the other way, so the tag brings back the X-ray as it was.
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # others undo themselves
    stored = (
        xray if orientation == 1
        else xray.transpose(turn.get(orientation, image_io._UPRIGHT[orientation]))
    )  # fmt: skip
    stored.save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    assert Image.open(path).getexif().get(0x0112) == orientation
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("L").resize(
        (64, 64), Image.Resampling.BILINEAR))  # fmt: skip
    pixels = load_grayscale(path, 64)
    assert np.abs(pixels.astype(int) - expected).mean() < 1.5  # resampling order and JPEG only
    reference = load_grayscale(_saved(xray, tmp_path / f"plain{suffix}"), 64)
    assert np.abs(pixels.astype(int) - reference).mean() < 3  # upright: the same X-ray


def _saved(image: Image.Image, path):
    image.save(path, **({"quality": 100} if path.suffix == ".jpg" else {}))
    return path
