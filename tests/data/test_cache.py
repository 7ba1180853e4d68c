import json

import numpy as np

from pneumonia.data import cache as cache_module
from pneumonia.data.cache import build_or_load
from pneumonia.data.image_io import load_grayscale


def _some_images(data_root, n=6):
    return sorted((data_root / "train" / "PNEUMONIA").iterdir())[:n]


def test_cache_holds_the_decoded_pixels_memory_mapped(data_root, tmp_path):
    paths = _some_images(data_root)
    cached = build_or_load(paths, 64, tmp_path, num_workers=1, progress=False)
    assert isinstance(cached.pixels, np.memmap)
    assert cached.pixels.shape == (len(paths), 64, 64)
    assert cached.valid.all()
    np.testing.assert_array_equal(cached.pixels[3], load_grayscale(paths[3], 64))


def test_second_call_decodes_nothing(data_root, tmp_path, monkeypatch):
    paths = _some_images(data_root)
    build_or_load(paths, 64, tmp_path, num_workers=1, progress=False)

    def fail(job):
        raise AssertionError(f"decoded {job} again")

    monkeypatch.setattr(cache_module, "_decode", fail)
    again = build_or_load(paths, 64, tmp_path, num_workers=1, progress=False)
    assert again.pixels.shape[0] == len(paths)


def test_new_size_or_new_file_gets_a_new_cache(data_root, tmp_path):
    paths = _some_images(data_root)
    build_or_load(paths[:4], 64, tmp_path, num_workers=1, progress=False)
    build_or_load(paths[:4], 32, tmp_path, num_workers=1, progress=False)
    build_or_load(paths[:5], 64, tmp_path, num_workers=1, progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert not list(tmp_path.glob("*.tmp-*"))


def test_corrupt_and_unreadable_files_are_skipped_and_listed(data_root, tmp_path, caplog):
    paths = _some_images(data_root, 4)
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    mixed = [paths[0], broken, paths[1], empty, paths[2]]
    cached = build_or_load(mixed, 64, tmp_path / "cache", num_workers=2, progress=False)
    assert cached.valid.tolist() == [True, False, True, False, True]
    assert set(cached.failures) == {str(broken), str(empty)}
    assert "skipping 2 unreadable image(s) of 5" in caplog.text and "broken.jpeg" in caplog.text
    index = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert set(index["failures"]) == {str(broken), str(empty)}
