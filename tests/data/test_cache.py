import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pneumonia.data import cache as cache_module
from pneumonia.data.cache import CACHE_FORMAT, build_or_load
from pneumonia.data.image_io import load_grayscale
from tests.conftest import copy_image


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


# --- a cache is checked, not trusted -------------------------------------------------------------


def _built(data_root, cache_dir, n=6, size=32):
    paths = [str(p) for p in _some_images(data_root, n)]
    build_or_load(paths, size, cache_dir, num_workers=1, progress=False)
    (pixels_path,) = cache_dir.glob("*.npy")
    return paths, pixels_path, pixels_path.with_suffix(".json")


def _count_decodes(monkeypatch):
    calls = []
    real = cache_module._decode

    def counting(job):
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(cache_module, "_decode", counting)
    return calls


def _assert_rebuilt(paths, cache_dir, caplog, monkeypatch, *fragments):
    """Loading again warns with every fragment, decodes everything again and gives true pixels."""
    caplog.clear()
    calls = _count_decodes(monkeypatch)
    cached = build_or_load(paths, 32, cache_dir, num_workers=1, progress=False)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "damaged and will be rebuilt" in warning
    for fragment in fragments:
        assert fragment in warning
    assert calls == paths
    expected = np.stack([load_grayscale(p, 32) for p in paths])
    np.testing.assert_array_equal(cached.pixels, expected)
    calls.clear()
    build_or_load(paths, 32, cache_dir, num_workers=1, progress=False)
    assert calls == []  # the rebuilt cache passes its own checks


def test_truncated_cache_is_rebuilt(data_root, tmp_path, caplog, monkeypatch):
    paths, pixels_path, _ = _built(data_root, tmp_path)
    size = pixels_path.stat().st_size
    os.truncate(pixels_path, size - 100)
    _assert_rebuilt(paths, tmp_path, caplog, monkeypatch, f"{pixels_path} is truncated: ")
    assert pixels_path.stat().st_size == size


def test_one_corrupt_byte_is_caught_by_the_checksum(data_root, tmp_path, caplog, monkeypatch):
    paths, pixels_path, _ = _built(data_root, tmp_path)
    with pixels_path.open("r+b") as file:
        file.seek(pixels_path.stat().st_size - 32 * 32 * 3 + 517)  # a pixel of the 4th image
        value = file.read(1)[0]
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([value ^ 0x01]))
    _assert_rebuilt(paths, tmp_path, caplog, monkeypatch, f"{pixels_path} has pixel checksum")


def test_header_of_another_shape_is_caught(data_root, tmp_path, caplog, monkeypatch):
    paths, pixels_path, _ = _built(data_root, tmp_path)
    # Same bytes and byte count under a header that says (6, 16, 64): only the shape check sees it.
    pixels = np.load(pixels_path).reshape(6, 16, 64)
    np.save(pixels_path, pixels)
    _assert_rebuilt(
        paths, tmp_path, caplog, monkeypatch, f"{pixels_path} holds an array of shape (6, 16, 64)"
    )


def test_wrong_dtype_or_no_npy_header_is_caught(data_root, tmp_path, caplog, monkeypatch):
    paths, pixels_path, _ = _built(data_root, tmp_path)
    np.save(pixels_path, np.zeros((6, 32, 32), dtype=np.float32))
    _assert_rebuilt(
        paths,
        tmp_path,
        caplog,
        monkeypatch,
        f"{pixels_path} has no valid .npy header (dtype float32",
    )
    pixels_path.write_bytes(b"not an npy file at all")
    _assert_rebuilt(
        paths, tmp_path, caplog, monkeypatch, f"{pixels_path} has no valid .npy header ("
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a list, not an object"),
        ("", "is not valid JSON"),
        (f'{{"format": {CACHE_FORMAT}, "key": "k"}}', "says key='k', expected"),
        ("[" * 200_000, "is not valid JSON"),  # deep enough to exhaust the parser's recursion
    ],
)
def test_garbage_index_is_caught(data_root, tmp_path, caplog, monkeypatch, content, fragment):
    paths, _, index_path = _built(data_root, tmp_path)
    index_path.write_text(content)
    _assert_rebuilt(paths, tmp_path, caplog, monkeypatch, f"the index {index_path} {fragment}")
    assert json.loads(index_path.read_text())["count"] == 6


def test_index_that_disagrees_with_the_file_list_is_caught(
    data_root, tmp_path, caplog, monkeypatch
):
    paths, _, index_path = _built(data_root, tmp_path)
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "count": 5}))
    _assert_rebuilt(paths, tmp_path, caplog, monkeypatch, f"the index {index_path} says count=5")
    index_path.write_text(json.dumps({**index, "checksum": "crc32:00000000"}))
    _assert_rebuilt(
        paths, tmp_path, caplog, monkeypatch, "recorded crc32:00000000: the pixels are corrupt"
    )
    index_path.unlink()
    _assert_rebuilt(paths, tmp_path, caplog, monkeypatch, "-32px.npy has no index")


# --- failures are retried ------------------------------------------------------------------------


def test_image_that_failed_is_picked_up_once_it_decodes(data_root, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="pneumonia.data.cache")
    paths = [str(p) for p in _some_images(data_root, 4)]
    flaky = copy_image(_some_images(data_root, 8)[7], tmp_path / "data" / "person9999_virus_1.jpeg")
    paths.insert(2, str(flaky))
    real = cache_module._decode

    def read_error_once(job):  # as a network file system's hiccup: the file itself is unchanged
        return (
            (None, "OSError: [Errno 5] Input/output error") if job[0] == str(flaky) else real(job)
        )

    monkeypatch.setattr(cache_module, "_decode", read_error_once)
    first = build_or_load(paths, 32, tmp_path / "cache", num_workers=1, progress=False)
    assert first.valid.tolist() == [True, True, False, True, True]

    monkeypatch.setattr(cache_module, "_decode", real)
    calls = _count_decodes(monkeypatch)
    second = build_or_load(paths, 32, tmp_path / "cache", num_workers=1, progress=False)
    assert calls == [str(flaky)]  # only the failed file is decoded again
    assert second.valid.all() and second.failures == {}
    np.testing.assert_array_equal(second.pixels[2], load_grayscale(flaky, 32))
    np.testing.assert_array_equal(second.pixels[3], first.pixels[3])
    assert "now decode" in caplog.text
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # replaced, not added
    assert not list((tmp_path / "cache").glob("*.tmp-*"))

    calls.clear()
    third = build_or_load(paths, 32, tmp_path / "cache", num_workers=1, progress=False)
    assert calls == [] and third.valid.all()  # the update was written: nothing left to retry


def test_a_file_rewritten_with_its_size_and_time_is_decoded_again(data_root, tmp_path):
    normal, pneumonia = (
        sorted((data_root / "train" / "NORMAL").glob("*.jpeg"))[0],
        sorted((data_root / "train" / "PNEUMONIA").glob("*.jpeg"))[0],
    )
    image = copy_image(normal, tmp_path / "data" / "IM-0001-0001.jpeg")
    first = build_or_load([str(image)], 32, tmp_path / "cache", num_workers=1, progress=False)
    stamp, size = image.stat().st_mtime_ns, image.stat().st_size
    other = pneumonia.read_bytes()[:size]
    image.write_bytes(other + b"\0" * (size - len(other)))  # another X-ray, padded to the size
    os.utime(image, ns=(stamp, stamp))  # and the old time put back, as cp -p or rsync -t do
    second = build_or_load([str(image)], 32, tmp_path / "cache", num_workers=1, progress=False)
    assert not np.array_equal(np.asarray(second.pixels[0]), np.asarray(first.pixels[0]))
    np.testing.assert_array_equal(second.pixels[0], load_grayscale(image, 32))


def test_still_failing_image_is_retried_without_rewriting(data_root, tmp_path, monkeypatch):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = [str(_some_images(data_root, 1)[0]), str(broken)]
    build_or_load(paths, 32, tmp_path / "cache", num_workers=1, progress=False)
    (pixels_path,) = (tmp_path / "cache").glob("*.npy")
    before = pixels_path.stat()
    calls = _count_decodes(monkeypatch)
    again = build_or_load(paths, 32, tmp_path / "cache", num_workers=1, progress=False)
    assert calls == [str(broken)]
    assert again.valid.tolist() == [True, False]
    after = pixels_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# --- leftovers and unwritable folders ------------------------------------------------------------


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_builds_are_removed_but_live_ones_kept(data_root, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    dead, host = _dead_pid(), cache_module._HOST
    day_ago = time.time() - 2 * cache_module.STALE_TMP_SECONDS
    removed = [
        cache_dir / f"0123456789abcdef0123-128px.npy.tmp-{dead}",  # name of the earlier format
        cache_dir / f"0123456789abcdef0123-128px.npy.tmp-{dead}-{host}",
        cache_dir / f"0123456789abcdef0123-128px.json.tmp-{dead}-{host}",
        cache_dir / f"aaaaaaaaaaaaaaaaaaaa-64px.npy.tmp-{os.getpid()}-other-host.example",
    ]
    kept = [
        cache_dir / f"bbbbbbbbbbbbbbbbbbbb-64px.npy.tmp-{os.getpid()}-{host}",  # a live build here
        cache_dir
        / f"cccccccccccccccccccc-64px.npy.tmp-{dead}-other-host.example",  # recent, elsewhere
        cache_dir / "notes.tmp-12",
    ]
    for path in removed + kept:
        path.write_bytes(b"partial")
    os.utime(removed[-1], (day_ago, day_ago))
    build_or_load(_some_images(data_root, 2), 32, cache_dir, num_workers=1, progress=False)
    assert [p for p in removed if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    # A later call that finds its cache (builds nothing) cleans up too.
    removed[0].write_bytes(b"partial")
    build_or_load(_some_images(data_root, 2), 32, cache_dir, num_workers=1, progress=False)
    assert not removed[0].exists()


def test_unwritable_cache_folder_falls_back_to_a_temporary_one(
    data_root, tmp_path, caplog, monkeypatch
):
    # Root ignores permission bits, so make the folder impossible instead: below a regular file.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    wanted = blocker / "cache"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system_tmp"))
    (tmp_path / "system_tmp").mkdir()
    paths = _some_images(data_root, 3)
    cached = build_or_load(paths, 32, wanted, num_workers=1, progress=False)
    fallback = tmp_path / "system_tmp" / f"pneumonia-cache-{os.getuid()}"
    assert Path(cached.pixels.filename).parent == fallback
    assert cached.valid.all()
    message = next(r.getMessage() for r in caplog.records if "cannot write" in r.getMessage())
    assert str(wanted) in message and str(fallback) in message

    calls = _count_decodes(monkeypatch)
    again = build_or_load(paths, 32, wanted, num_workers=1, progress=False)
    assert calls == [] and Path(again.pixels.filename).parent == fallback  # reused


def test_valid_cache_in_a_read_only_folder_is_used_in_place(data_root, tmp_path, monkeypatch):
    paths, pixels_path, _ = _built(data_root, tmp_path / "shared_cache")
    monkeypatch.setattr(cache_module, "_write_problem", lambda folder: "Read-only file system")
    calls = _count_decodes(monkeypatch)
    cached = build_or_load(paths, 32, tmp_path / "shared_cache", num_workers=1, progress=False)
    assert calls == [] and Path(cached.pixels.filename) == pixels_path


def test_missing_file_in_the_list_is_a_failure_not_a_crash(data_root, tmp_path):
    (tmp_path / "dangling.jpeg").symlink_to(tmp_path / "gone.jpeg")
    paths = [_some_images(data_root, 1)[0], tmp_path / "dangling.jpeg", tmp_path / "never.jpeg"]
    cached = build_or_load(paths, 32, tmp_path / "cache", num_workers=1, progress=False)
    assert cached.valid.tolist() == [True, False, False]
    assert "dangling symbolic link" in cached.failures[str(tmp_path / "dangling.jpeg")]


def test_processes_starting_together_build_the_cache_once(data_root, tmp_path):
    # As the jobs of hydra/launcher=shared_device do at a new image size.
    paths = [str(p) for p in _some_images(data_root, 150)]
    go = tmp_path / "go"
    script = (
        "import logging, os, time; from pneumonia.data.cache import build_or_load\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"print('ready', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        f"build_or_load({paths!r}, 40, {str(tmp_path / 'cache')!r}, num_workers=1, progress=False)"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    assert [job.stdout.readline().strip() for job in jobs] == ["ready"] * 3
    go.touch()  # all three ask for the cache at once
    logs = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0]
    assert sum("cached 150 images" in log for log in logs) == 1, logs


def test_a_file_system_without_locks_still_builds_the_cache(data_root, tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cached = build_or_load(
        _some_images(data_root, 2), 32, tmp_path / "c", num_workers=1, progress=False
    )
    assert cached.valid.all()
