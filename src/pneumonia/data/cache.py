"""An on-disk cache of decoded, resized images, memory-mapped for training.

Decoding JPEGs dominates the cost of a small CNN's epoch. Each image is decoded once per
(file list, image size); the pixels go to one ``.npy`` file of shape ``(N, S, S)`` uint8, read back
with ``mmap_mode="r"`` so later epochs, runs and sweep members share the page cache, and a dataset
larger than RAM still works. Files that fail to decode are recorded in the index and skipped.

A cache is checked, not trusted. Beside ``<key>-<S>px.npy`` lies its index ``<key>-<S>px.json``
(format, key, image size, count, decode failures and a checksum of the pixel bytes). On load the
index must parse and match this file list and size, the ``.npy`` header must say uint8
``(N, S, S)``, the file must be exactly header + N*S*S bytes long, and the checksum must match.
Anything else (a truncated copy, a flipped byte, a header of another shape, a garbage index) is
logged as a warning naming the file and what was wrong, and the cache is rebuilt.

The checksum is CRC-32 (zlib) over every pixel byte, not over a sample: a sample misses most
damage (a single corrupt byte anywhere), and the whole pass is cheap. For the 5,232 training images
at 128 px (86 MB) it takes 0.03-0.05 s, against 1.7-4.8 s to build the cache with 2 workers on a
shared 2-core machine (sha256 0.08 s, blake2b 0.18 s there), and it warms the page cache that the
first epoch reads anyway. A cryptographic hash would buy nothing: whoever can rewrite the pixels
can rewrite the index too; the checksum is there to catch accidents.

Other guarantees:

- Writing goes to temporary files (``<name>.tmp-<pid>-<host>``) renamed into place, so an
  interrupted build or two processes building at once never leave a half-written cache behind.
  Leftovers of a killed build are removed by the next call: those whose process is gone (same
  host), or any untouched for :data:`STALE_TMP_SECONDS`; a live build's files are left alone.
- Files that failed to decode are tried again on every load (only those files); if any now
  decode, an updated cache is written the same atomic way. Nothing is decoded when none failed.
- A cache folder that cannot be created or written falls back to a folder under
  :func:`tempfile.gettempdir` with a warning naming both. A valid cache in a read-only folder is
  still used as it is.
- Space for the pixels is reserved before they are written: a memory-mapped write into a sparse
  file on a full disk kills the process with SIGBUS instead of raising an error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pneumonia.data.image_io import decode_or_reason
from pneumonia.locks import exclusive_lock

log = logging.getLogger(__name__)

# 2: the index records the key and a CRC-32 of the pixels; 3: images turned upright by their EXIF
# orientation (caches decoded before would hold rotated copies of such files); 4: 16-bit images
# stretched between percentiles, not min..max
CACHE_FORMAT = 4
_CHUNK = 64
_READ_BLOCK = 1 << 20
#: A temporary file untouched this long is a leftover even if its pid looks alive (pid reuse, or a
#: build on another host sharing the folder, whose pids mean nothing here).
STALE_TMP_SECONDS = 24 * 3600
_TMP_NAME = re.compile(r"^.+\.(?:npy|json)\.tmp-(\d+)(?:-(.+))?$")
_HOST = socket.gethostname() or "localhost"


class CacheError(OSError):
    """The cache cannot be written (or read back); the message names the file."""


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


def pixel_digests(pixels: np.ndarray, rows: np.ndarray) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each image ``pixels[row]``: equal digests mean equal pixels.

    About a second for 5,000 images at 256 px; the cache is read in blocks, never whole.
    """
    digests: list[bytes] = []
    for start in range(0, len(rows), 1024):
        block = np.ascontiguousarray(pixels[rows[start : start + 1024]])
        digests += [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in block]
    return digests


def _reopen(
    pixels_path: str, valid: np.ndarray, paths: tuple[str, ...], failures: dict[str, str]
) -> CachedImages:
    return CachedImages(_map(Path(pixels_path)), valid, paths, failures)


def _map(pixels_path: Path) -> np.ndarray:
    try:
        return np.load(pixels_path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot map the image cache {pixels_path}: {err}") from err


def cache_key(paths: Sequence[str | Path], image_size: int) -> str:
    """Key that changes when any file is added, removed, replaced or rewritten, or the size changes.

    A file's identity is its size, modification time, inode and status-change time: a rewrite that
    keeps the byte count and puts the modification time back (``os.utime``, ``cp -p``, ``rsync
    -t``) still moves the status-change time, which no program can set.

    A path that cannot be stat'ed (missing, a dangling or looping link) still gets a key: its error
    number stands in for size and time, so the key changes when the file appears.
    """
    digest = hashlib.sha256(f"format={CACHE_FORMAT};size={image_size}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            identity = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
            digest.update(f"\n{path}\t{identity}".encode())
        except OSError as err:
            digest.update(f"\n{path}\terrno={err.errno}".encode())
    return digest.hexdigest()[:20]


def _decode(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    image = decode_or_reason(*job)
    return (None, image) if isinstance(image, str) else (image, None)


def build_or_load(
    paths: Sequence[str | Path],
    image_size: int,
    cache_dir: str | Path,
    num_workers: int | None = None,
    progress: bool = True,
) -> CachedImages:
    """Return the cached pixels for ``paths`` at ``image_size``, decoding them first if needed.

    An existing cache is verified first and rebuilt if it is damaged; images that failed to decode
    last time are retried (see the module's docstring).

    Raises:
        CacheError: the cache can be written neither in ``cache_dir`` nor in the temporary folder,
            or cannot be read back after writing; the message names the files.
    """
    paths = [str(p) for p in paths]
    key = cache_key(paths, image_size)
    name = f"{key}-{image_size}px"
    folder = Path(cache_dir).expanduser()
    _remove_stale_tmp(folder)  # on every call: a killed build's file can be large
    index = _verified_index(folder, name, key, len(paths), image_size)
    writable: Path | None = None
    built = False
    if index is None:
        writable = _writable_folder(folder)
        with _one_builder(writable, name) as waited:
            if waited or writable != folder:  # another process may have just built it there
                index = _verified_index(writable, name, key, len(paths), image_size)
            if index is None:
                index = _build(paths, image_size, writable, name, key, num_workers, progress)
                built = True
        folder = writable
    if not built:
        log.info("using cached images %s", folder / f"{name}.npy")
        if index["failures"]:
            index, folder = _retry_failures(
                paths, image_size, folder, writable, name, key, index, num_workers
            )
    failures = dict(index["failures"])
    valid = np.array([p not in failures for p in paths], dtype=bool)
    if failures:
        log.warning(
            "skipping %d unreadable image(s) of %d: %s",
            len(failures),
            len(paths),
            "; ".join(f"{p} ({e})" for p, e in failures.items()),
        )
    pixels = _map(folder / f"{name}.npy")
    return CachedImages(pixels=pixels, valid=valid, paths=tuple(paths), failures=failures)


# --- verification -------------------------------------------------------------------------------


def _verified_index(
    folder: Path, name: str, key: str, count: int, image_size: int
) -> dict[str, Any] | None:
    """The index of a cache that passes every check, or None (with a warning if one was damaged)."""
    pixels_path, index_path = folder / f"{name}.npy", folder / f"{name}.json"
    try:
        index, problem = _check(pixels_path, index_path, key, count, image_size)
    except OSError as err:  # e.g. a permission problem while reading: as good as damaged
        index, problem = None, f"{pixels_path} cannot be read ({err})"
    if problem is not None:
        log.warning("the image cache is damaged and will be rebuilt: %s", problem)
    return index


def _check(
    pixels_path: Path, index_path: Path, key: str, count: int, image_size: int
) -> tuple[dict[str, Any] | None, str | None]:
    """(index, None) if sound, (None, what is wrong) if damaged, (None, None) if absent."""
    has_pixels, has_index = pixels_path.is_file(), index_path.is_file()
    if not has_pixels and not has_index:
        return None, None
    if not has_index:
        return None, f"{pixels_path} has no index {index_path.name} beside it"
    if not has_pixels:
        return None, f"the index {index_path} has no pixel file {pixels_path.name} beside it"
    try:
        index = json.loads(index_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError: ValueError
        return None, f"the index {index_path} is not valid JSON ({err})"
    problem = _index_problem(index, key, count, image_size)
    if problem is not None:
        return None, f"the index {index_path} {problem}"
    with pixels_path.open("rb") as file:
        try:
            shape, offset = _read_header(file)
        except ValueError as err:
            return None, f"{pixels_path} has no valid .npy header ({err})"
        if shape != (count, image_size, image_size):
            return None, (
                f"{pixels_path} holds an array of shape {shape}, but its index and the "
                f"{count} files at {image_size}px need {(count, image_size, image_size)}"
            )
        expected = offset + count * image_size * image_size
        actual = os.fstat(file.fileno()).st_size
        if actual != expected:
            what = "truncated" if actual < expected else "longer than its header says"
            return None, f"{pixels_path} is {what}: {actual:,} bytes, expected {expected:,}"
        checksum = _checksum(file, offset)
    if checksum != index["checksum"]:
        return None, (
            f"{pixels_path} has pixel checksum {checksum}, but {index_path.name} recorded "
            f"{index['checksum']}: the pixels are corrupt"
        )
    return index, None


def _index_problem(index: Any, key: str, count: int, image_size: int) -> str | None:
    if not isinstance(index, dict):
        return f"holds a {type(index).__name__}, not an object"
    expected = {"format": CACHE_FORMAT, "key": key, "image_size": image_size, "count": count}
    for field, want in expected.items():
        if index.get(field) != want:
            return f"says {field}={index.get(field)!r}, expected {want!r}"
    failures = index.get("failures")
    if not isinstance(failures, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in failures.items()
    ):
        return "has no valid 'failures' mapping of path to error"
    if not isinstance(index.get("checksum"), str):
        return "has no checksum"
    return None


def _read_header(file) -> tuple[tuple[int, ...], int]:
    """Shape and data offset of a C-ordered uint8 .npy file; ValueError for anything else."""
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype != np.uint8 or fortran_order:
        raise ValueError(f"dtype {dtype}{' (Fortran order)' if fortran_order else ''}, not uint8")
    return tuple(int(n) for n in shape), file.tell()


def _checksum(file, offset: int) -> str:
    """CRC-32 of everything after ``offset`` (the pixel bytes), as ``"crc32:<8 hex digits>"``."""
    file.seek(offset)
    crc = 0
    while block := file.read(_READ_BLOCK):
        crc = zlib.crc32(block, crc)
    return f"crc32:{crc:08x}"


# --- where to write -----------------------------------------------------------------------------


def _write_problem(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (creating it if needed), or None if it can.

    Tried for real rather than with ``os.access``: root passes every permission check but still
    cannot write to a read-only mount or below a regular file.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return str(err)
    return None


@contextmanager
def _one_builder(folder: Path, name: str) -> Iterator[bool]:
    """Build a cache in one process at a time; the others wait, then load what it built.

    Sweep jobs that start together (``hydra/launcher=shared_device``) would otherwise all decode
    the same images into the same cache. Yields whether it had to wait for another process.
    """

    def say_why_it_waits(_: int) -> None:
        log.info("another process is building %s: waiting for it", folder / f"{name}.npy")

    with exclusive_lock(
        folder / f"{name}.lock", "concurrent builds are not prevented", when_held=say_why_it_waits
    ) as held:
        yield held.waited


def _writable_folder(folder: Path) -> Path:
    """``folder`` if it can be written, otherwise a private folder under the temporary folder."""
    problem = _write_problem(folder)
    if problem is None:
        return folder
    fallback = Path(tempfile.gettempdir()) / f"pneumonia-cache-{os.getuid()}"
    fallback_problem = _write_problem(fallback)
    if fallback_problem is None and fallback.stat().st_uid != os.getuid():
        fallback_problem = "it belongs to another user"
    if fallback_problem is not None:
        # Someone else's or unusable: a fresh private folder (not reused by later runs).
        try:
            fallback = Path(tempfile.mkdtemp(prefix="pneumonia-cache-"))
        except OSError as err:
            raise CacheError(
                f"cannot write the image cache in {folder} ({problem}) nor in the temporary "
                f"folder {tempfile.gettempdir()} ({err}); set paths.cache_dir to a writable folder"
            ) from err
    log.warning(
        "cannot write the image cache in %s (%s); caching in the temporary folder %s instead "
        "(set paths.cache_dir to a writable folder to keep it)",
        folder,
        problem,
        fallback,
    )
    return fallback


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_tmp(folder: Path) -> None:
    """Delete temporary files of builds that were killed (see the module's docstring)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match is None:
            continue
        pid, host = int(match.group(1)), match.group(2)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:  # removed meanwhile by another process's clean-up
            continue
        if host in (None, _HOST) and not _pid_alive(pid):
            why = f"its process {pid} is gone"
        elif age > STALE_TMP_SECONDS:
            why = f"untouched for {age / 3600:.0f} h"
        else:
            continue  # a build in progress, here or on another host
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("cannot remove the leftover temporary file %s: %s", entry.path, err)
            continue
        log.info("removed %s, left over by an interrupted cache build (%s)", entry.path, why)


# --- writing ------------------------------------------------------------------------------------


def _write_cache(
    folder: Path,
    name: str,
    key: str,
    shape: tuple[int, int, int],
    fill: Callable[[np.ndarray, dict[str, str]], None],
) -> dict[str, Any]:
    """Write pixels (``fill(out, failures)`` fills both) and index atomically; return the index."""
    pixels_path, index_path = folder / f"{name}.npy", folder / f"{name}.json"
    tmp_suffix = f".tmp-{os.getpid()}-{_HOST}"
    tmp_pixels = pixels_path.with_name(pixels_path.name + tmp_suffix)
    tmp_index = index_path.with_name(index_path.name + tmp_suffix)
    failures: dict[str, str] = {}
    _remove_stale_tmp(folder)  # the fallback folder, too, may hold a killed build's files
    try:
        try:
            out = np.lib.format.open_memmap(tmp_pixels, mode="w+", dtype=np.uint8, shape=shape)
            _reserve(tmp_pixels)
        except OSError as err:
            raise CacheError(f"cannot create the image cache file {tmp_pixels}: {err}") from err
        fill(out, failures)
        out.flush()
        del out
        with tmp_pixels.open("rb") as file:
            _, offset = _read_header(file)
            checksum = _checksum(file, offset)
        index = {
            "format": CACHE_FORMAT,
            "key": key,
            "image_size": shape[1],
            "count": shape[0],
            "checksum": checksum,
            "failures": failures,
        }
        try:
            tmp_index.write_text(json.dumps(index))
            os.replace(tmp_pixels, pixels_path)
            os.replace(tmp_index, index_path)
        except OSError as err:
            raise CacheError(f"cannot write the image cache {pixels_path}: {err}") from err
    finally:
        tmp_pixels.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
    return index


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now, so a full disk is an OSError here, not a SIGBUS later."""
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno == errno.ENOSPC:  # others (not supported by the file system) are harmless
            raise
    finally:
        os.close(fd)


def _workers(num_workers: int | None) -> int:
    # The CPUs this process may use, not the machine's: a CPU-limited container has fewer.
    return num_workers if num_workers is not None else len(os.sched_getaffinity(0))


def _decode_all(
    jobs: list[tuple[str, int]], workers: int, bar
) -> Iterable[tuple[np.ndarray | None, str | None]]:
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_decode, jobs, chunksize=_CHUNK):
                bar.update()
                yield result
    else:
        for job in jobs:
            bar.update()
            yield _decode(job)


def _build(
    paths: list[str],
    image_size: int,
    folder: Path,
    name: str,
    key: str,
    num_workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    jobs = [(p, image_size) for p in paths]
    bar = tqdm(
        total=len(jobs), desc=f"decoding images at {image_size}px", unit="img", disable=not progress
    )

    def fill(out: np.ndarray, failures: dict[str, str]) -> None:
        for i, (pixels, error) in enumerate(_decode_all(jobs, _workers(num_workers), bar)):
            if error is None:
                out[i] = pixels
            else:
                out[i] = 0
                failures[paths[i]] = error

    try:
        index = _write_cache(folder, name, key, (len(paths), image_size, image_size), fill)
    finally:
        bar.close()
    log.info(
        "cached %d images at %dpx in %s",
        len(paths) - len(index["failures"]),
        image_size,
        folder / f"{name}.npy",
    )
    return index


def _retry_failures(
    paths: list[str],
    image_size: int,
    folder: Path,
    writable: Path | None,
    name: str,
    key: str,
    index: dict[str, Any],
    num_workers: int | None,
) -> tuple[dict[str, Any], Path]:
    """Decode the recorded failures again; write an updated cache if any of them now decode.

    Returns the index to use and the folder its cache is in.
    """
    rows = [i for i, p in enumerate(paths) if p in index["failures"]]
    jobs = [(paths[i], image_size) for i in rows]
    # Usually a handful of files: a process pool would cost more than it saves.
    workers = _workers(num_workers) if len(jobs) > _CHUNK else 1
    with tqdm(total=len(jobs), disable=True) as bar:
        results = list(_decode_all(jobs, workers, bar))
    fixed = {
        row: pixels for row, (pixels, error) in zip(rows, results, strict=True) if error is None
    }
    still = {paths[row]: error for row, (_, error) in zip(rows, results, strict=True) if error}
    if not fixed:
        # Nothing to write; report today's errors, which may read differently.
        return {**index, "failures": still}, folder
    old_path = folder / f"{name}.npy"
    target = writable if writable is not None else _writable_folder(folder)

    def fill(out: np.ndarray, failures: dict[str, str]) -> None:
        old = np.load(old_path, mmap_mode="r")
        for start in range(0, len(out), 1024):  # block by block: the cache may exceed RAM
            out[start : start + 1024] = old[start : start + 1024]
        for row, pixels in fixed.items():
            out[row] = pixels
        failures.update(still)

    updated = _write_cache(target, name, key, (len(paths), image_size, image_size), fill)
    log.info(
        "%d image(s) that failed to decode before now decode; updated %s: %s",
        len(fixed),
        target / f"{name}.npy",
        ", ".join(paths[row] for row in fixed),
    )
    return updated, target
