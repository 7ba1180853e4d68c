import numpy as np
import pytest
from PIL import Image

from pneumonia.data.image_io import load_grayscale


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
    gray = rng.integers(0, 256, (60, 90), dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
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


def test_corrupt_file_raises_oserror(tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(OSError):
        load_grayscale(broken, 64)
