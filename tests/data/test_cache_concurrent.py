"""Two processes building the same cache at once both get a sound cache.

Each writes its own temporary files and renames them into place; the clean-up of leftovers that
each runs first must not delete the other's temporary files while it is still writing them.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np

from pneumonia.data import cache as cache_module
from pneumonia.data.image_io import load_grayscale


def _build_slowly(paths: list[str], cache_dir: str, start: float, delay: float, queue) -> None:
    real = cache_module._decode

    def slow(job):
        time.sleep(delay)  # keeps this build's temporary file around while the other starts
        return real(job)

    cache_module._decode = slow
    time.sleep(max(0.0, start - time.time()))
    try:
        cached = cache_module.build_or_load(paths, 32, cache_dir, num_workers=1, progress=False)
        queue.put(("ok", bool(cached.valid.all()), str(cached.pixels.filename)))
    except BaseException as err:
        queue.put(("error", f"{type(err).__name__}: {err}", ""))


def test_two_processes_building_at_once(data_root, tmp_path, monkeypatch):
    paths = [str(p) for p in sorted((data_root / "train" / "NORMAL").iterdir())[:16]]
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    queue = context.Queue()
    start = time.time() + 2.0  # both are imported and waiting by then
    workers = [
        # The second starts while the first is half-way: its clean-up sees a live build's files.
        context.Process(target=_build_slowly, args=(paths, str(tmp_path), start, 0.05, queue)),
        context.Process(
            target=_build_slowly, args=(paths, str(tmp_path), start + 0.4, 0.02, queue)
        ),
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert results == [("ok", True, results[0][2])] * 2
    assert not list(tmp_path.glob("*.tmp-*"))
    calls: list[str] = []
    real = cache_module._decode
    monkeypatch.setattr(cache_module, "_decode", lambda job: calls.append(job[0]) or real(job))
    cached = cache_module.build_or_load(paths, 32, tmp_path, num_workers=1, progress=False)
    assert calls == []  # what the two left behind passes every check
    assert Path(cached.pixels.filename) == Path(results[0][2])
    np.testing.assert_array_equal(cached.pixels[7], load_grayscale(paths[7], 32))
