"""One odd file never stops a run: FIFOs, links, bombs, tiny and transparent images, odd names.

A FIFO is the dangerous one: opening it for reading blocks until a writer appears. Every test that
puts one in the way runs under :func:`fifo_must_stay_closed`, which fails the test if anything
opens the FIFO and, by opening its write end, releases a reader that would otherwise hang the
whole test run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia.data.cache import build_or_load
from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.data.discovery import scan_images
from pneumonia.data.image_io import NotRegularFileError, load_grayscale
from tests.conftest import copy_image, make_subset
from tests.data.test_image_io import _png_header_only


@contextmanager
def fifo_must_stay_closed(fifo: Path) -> Iterator[None]:
    """Fail if anything opens ``fifo`` for reading while the block runs; never let it hang."""
    opened = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            try:
                # Succeeds only while some process holds the read end open (or waits to).
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader
                continue
            opened.set()
            os.close(fd)  # the reader sees end-of-file and returns

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    assert not opened.is_set(), f"{fifo} was opened for reading: a real run would hang there"


def test_fifo_is_refused_by_load_grayscale_without_opening(tmp_path):
    fifo = tmp_path / "person1_virus_1.jpeg"
    os.mkfifo(fifo)
    with fifo_must_stay_closed(fifo), pytest.raises(NotRegularFileError, match="FIFO"):
        load_grayscale(fifo, 64)


def test_fifo_in_a_class_folder_is_skipped_by_discovery(data_root, tmp_path, caplog):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=2)
    fifo = root / "train" / "PNEUMONIA" / "person1_virus_1.jpeg"
    os.mkfifo(fifo)
    with fifo_must_stay_closed(fifo):
        found = scan_images(root)
    assert len(found.images) == 4
    assert "FIFO" in found.skipped[str(fifo)]
    assert str(fifo) in caplog.text


def test_fifo_handed_to_the_cache_is_a_decode_failure(data_root, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    paths = [sorted((data_root / "train" / "NORMAL").iterdir())[0], fifo]
    with fifo_must_stay_closed(fifo):
        cached = build_or_load(paths, 32, tmp_path / "cache", num_workers=2, progress=False)
        again = build_or_load(paths, 32, tmp_path / "cache", num_workers=2, progress=False)
    assert cached.valid.tolist() == again.valid.tolist() == [True, False]
    assert "FIFO" in again.failures[str(fifo)]


def test_a_run_over_a_folder_of_odd_files_finishes_and_lists_them(data_root, tmp_path, caplog):
    """Discovery, cache and split over every kind of odd file at once, as a training run does."""
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=12)
    normal, pneumonia = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    donor = sorted((data_root / "train" / "NORMAL").iterdir())[40]
    # Left out by discovery (never opened):
    fifo = pneumonia / "person9000_virus_1.jpeg"
    os.mkfifo(fifo)
    (normal / "IM-9000-0001.jpeg").symlink_to(tmp_path / "deleted.jpeg")
    (normal / "IM-9001-0001.jpeg").symlink_to(normal / "IM-9002-0001.jpeg")
    (normal / "IM-9002-0001.jpeg").symlink_to(normal / "IM-9001-0001.jpeg")
    # Found, but fail to decode: marked "skipped" by the split.
    _png_header_only(pneumonia / "person9001_bacteria_1.png", 30000, 30000)
    Image.new("L", (10, 10), 100).save(normal / "IM-9003-0001.png")
    (pneumonia / "person9002_bacteria_1.jpeg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    # Found and used: transparency flattened, a name without a patient id.
    gray = np.asarray(Image.open(donor))
    Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)]), "RGBA").save(
        normal / "IM-9004-0001.png"
    )
    copy_image(donor, normal / "my_own_scan.jpeg")

    dm = ChestXrayDataModule(
        root,
        image_size=32,
        cache_dir=tmp_path / "cache",
        decode_workers=2,
        split_fractions=[1, 0, 0],
    )
    started = time.monotonic()
    with fifo_must_stay_closed(fifo):
        dm.prepare_data()
        dm.setup("fit")
    assert time.monotonic() - started < 60

    splits = {img.path.name: split for img, split in zip(dm.images, dm.splits, strict=True)}
    assert len(splits) == 24 + 5
    assert {name for name, split in splits.items() if split == "skipped"} == {
        "person9001_bacteria_1.png",
        "IM-9003-0001.png",
        "person9002_bacteria_1.jpeg",
    }
    assert splits["IM-9004-0001.png"] == splits["my_own_scan.jpeg"] == "train"
    assert len(dm.dataset("train")) == 24 + 2
    log = caplog.text
    for odd in ("person9000_virus_1", "IM-9000-0001", "IM-9001-0001", "IM-9002-0001"):
        assert odd in log  # discovery's warning
    assert "ImageTooLargeError" in log and "ImageTooSmallError" in log  # the cache's warning
    assert "1 of 29 images" in log and "my_own_scan.jpeg" in log  # no patient id


def test_a_file_name_that_is_not_utf8_is_skipped_and_listed(data_root, tmp_path, caplog):
    root = make_subset(data_root, tmp_path / "root", per_class=3)
    source = next((data_root / "train" / "NORMAL").iterdir())
    folder = os.fsencode(root / "train" / "NORMAL")
    odd = os.path.join(folder, b"IM-9107-0001\xff.jpeg")
    with open(odd, "wb") as f:
        f.write(source.read_bytes())
    found = scan_images(root)
    assert len(found.images) == 6
    (why,) = found.skipped.values()
    assert "not valid UTF-8" in why and "IM-9107-0001" in caplog.text


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF"])
def test_other_formats_behind_an_image_suffix_are_refused(data_root, tmp_path, fmt):
    source = next((data_root / "train" / "NORMAL").iterdir())
    disguised = tmp_path / "IM-0001-0001.png"
    Image.open(source).save(disguised, format=fmt)
    with pytest.raises(OSError, match="cannot identify image file"):
        load_grayscale(disguised, 64)
    assert load_grayscale(source, 64).shape == (64, 64)
