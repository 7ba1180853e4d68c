"""An on-disk cache of decoded, resized images, memory-mapped for training.

Decoding JPEGs dominates the cost of a small CNN's epoch. Each image is decoded once per
(file list, image size); the pixels go to one ``.npy`` file of shape ``(N, S, S)`` uint8, read back
with ``mmap_mode="r"`` so later epochs, runs and sweep members share the page cache, and a dataset
larger than RAM still works. Files that fail to decode are recorded in the index and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pneumonia.data.image_io import load_grayscale

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_CHUNK = 64


@dataclass(frozen=True)
class CachedImages:
    """Pixels of ``paths`` at ``image_size``; ``valid[i]`` is False where ``paths[i]`` failed to decode."""

    pixels: np.ndarray  # (N, S, S) uint8, memory-mapped read-only
    valid: np.ndarray  # (N,) bool
    paths: tuple[str, ...]
    failures: dict[str, str]  # path -> error message

    def __reduce__(self):
        # Pickling a memmap copies the whole array (ddp_spawn pickles the DataModule); reopen instead.
        return (_reopen, (str(self.pixels.filename), self.valid, self.paths, self.failures))


def _reopen(
    pixels_path: str, valid: np.ndarray, paths: tuple[str, ...], failures: dict[str, str]
) -> CachedImages:
    return CachedImages(np.load(pixels_path, mmap_mode="r"), valid, paths, failures)


def cache_key(paths: Sequence[str | Path], image_size: int) -> str:
    """Key that changes when any file is added, removed, resized on disk or touched, or the size changes."""
    digest = hashlib.sha256(f"format={CACHE_FORMAT};size={image_size}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\n{path}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _decode(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    path, image_size = job
    try:
        return load_grayscale(path, image_size), None
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on broken files
        return None, f"{type(err).__name__}: {err}"


def build_or_load(
    paths: Sequence[str | Path],
    image_size: int,
    cache_dir: str | Path,
    num_workers: int | None = None,
    progress: bool = True,
) -> CachedImages:
    """Return the cached pixels for ``paths`` at ``image_size``, decoding them first if needed.

    Writing goes to temporary files renamed into place, so an interrupted build or two processes
    building at once never leave a half-written cache behind.
    """
    paths = [str(p) for p in paths]
    cache_dir = Path(cache_dir).expanduser()
    key = cache_key(paths, image_size)
    pixels_path = cache_dir / f"{key}-{image_size}px.npy"
    index_path = pixels_path.with_suffix(".json")
    if not (pixels_path.exists() and index_path.exists()):
        _build(paths, image_size, pixels_path, index_path, num_workers, progress)
    else:
        log.info("using cached images %s", pixels_path)
    index = json.loads(index_path.read_text())
    failures = dict(index["failures"])
    valid = np.array([p not in failures for p in paths], dtype=bool)
    if failures:
        log.warning(
            "skipping %d unreadable image(s) of %d: %s",
            len(failures),
            len(paths),
            "; ".join(f"{p} ({e})" for p, e in failures.items()),
        )
    pixels = np.load(pixels_path, mmap_mode="r")
    return CachedImages(pixels=pixels, valid=valid, paths=tuple(paths), failures=failures)


def _build(
    paths: list[str],
    image_size: int,
    pixels_path: Path,
    index_path: Path,
    num_workers: int | None,
    progress: bool,
) -> None:
    pixels_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_suffix = f".tmp-{os.getpid()}"
    tmp_pixels = pixels_path.with_name(pixels_path.name + tmp_suffix)
    out = np.lib.format.open_memmap(
        tmp_pixels, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size)
    )
    failures: dict[str, str] = {}
    jobs = [(p, image_size) for p in paths]
    # The CPUs this process may use, not the machine's: a CPU-limited container has fewer.
    workers = num_workers if num_workers is not None else len(os.sched_getaffinity(0))
    bar = tqdm(
        total=len(jobs), desc=f"decoding images at {image_size}px", unit="img", disable=not progress
    )
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = pool.map(_decode, jobs, chunksize=_CHUNK)
                _store(results, out, paths, failures, bar)
        else:
            _store(map(_decode, jobs), out, paths, failures, bar)
        out.flush()
        del out
        tmp_index = index_path.with_name(index_path.name + tmp_suffix)
        tmp_index.write_text(
            json.dumps({"image_size": image_size, "count": len(paths), "failures": failures})
        )
        os.replace(tmp_pixels, pixels_path)
        os.replace(tmp_index, index_path)
    finally:
        bar.close()
        tmp_pixels.unlink(missing_ok=True)
    log.info("cached %d images at %dpx in %s", len(paths) - len(failures), image_size, pixels_path)


def _store(results, out: np.ndarray, paths: list[str], failures: dict[str, str], bar) -> None:
    for i, (pixels, error) in enumerate(results):
        if error is None:
            out[i] = pixels
        else:
            out[i] = 0
            failures[paths[i]] = error
        bar.update()
