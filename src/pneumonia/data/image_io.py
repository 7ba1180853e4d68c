"""Decoding one X-ray into the square 8-bit grayscale array every model here consumes.

Odd files are refused with an ``OSError`` or a ``ValueError`` that names the file and what is
wrong, and never by blocking, so callers can skip them and go on:

- anything that is not a regular file (a FIFO, socket, device or folder) is rejected from its
  ``stat`` and never read: opening a FIFO blocks until a writer appears, i.e. for ever;
- a dangling or looping symbolic link fails its ``stat`` (``OSError``, named as such);
- an image with more than :data:`MAX_PIXELS` pixels is rejected from its header, before its pixels
  are decoded (:class:`ImageTooLargeError`); PIL's own ``DecompressionBombError`` (not an
  ``OSError``) and ``DecompressionBombWarning`` become that error too;
- an image whose shorter side is under :data:`MIN_SIDE` pixels is no X-ray
  (:class:`ImageTooSmallError`).

A malformed file can still make one of PIL's decoders raise something else (``struct.error``,
``IndexError``, ...); the cache therefore catches every exception per file.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes whose values do not fit 0..255 and must be rescaled rather than clipped by convert("L").
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: 16-bit and float images are stretched to 0..255 between these percentiles of their pixels.
STRETCH_PERCENTILES = (0.1, 99.9)

#: Largest image accepted, in pixels (width x height): 6000 x 6000 = 36 MP. The Kaggle originals are
#: at most about 2900 x 2900 (8.4 MP; 2172 x 1963 in ../shared/data/originals) and a 43 x 43 cm
#: detector at 100 um gives 4300 x 4300 (18.5 MP), so no real chest X-ray comes near it. It bounds
#: one decode's memory per decoding process (a 16-bit image goes through float32: about 10 bytes a
#: pixel, 360 MB at the limit). It is below PIL's own limits (``Image.MAX_IMAGE_PIXELS``: a warning
#: over 89 MP, an error over 179 MP), which are process-wide settings this module leaves alone.
MAX_PIXELS = 6000 * 6000

#: Smallest accepted side, in pixels. The originals in ../shared/data/originals are at least 219 px
#: on their short side, and no model here takes less than 32 px (the DataModule's smallest
#: image_size): a 1 x 1 or 10 x 10 "image" is an icon, a placeholder or a broken export, and
#: upscaling it would only feed the model a blur.
MIN_SIDE = 32

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class UnusableImageError(ValueError):
    """The file decodes (or its header does) but cannot be one of this project's X-rays."""


class ImageTooLargeError(UnusableImageError):
    """The image has more than :data:`MAX_PIXELS` pixels (or PIL flags it as a decompression bomb)."""


class ImageTooSmallError(UnusableImageError):
    """The image's shorter side is under :data:`MIN_SIDE` pixels."""


class NotRegularFileError(OSError):
    """The path is a FIFO, socket, device or folder: it is never opened as an image."""


def file_kind(mode: int) -> str:
    """Words for a non-regular file's type from its ``st_mode`` ("a FIFO (named pipe)", ...)."""
    for test, words in _FILE_KINDS:
        if test(mode):
            return words
    return "not a regular file"


def stat_error_reason(path: str | Path, err: OSError) -> str:
    """Why ``os.stat(path)`` failed, in words: a dangling link and a link loop are named as such."""
    if err.errno == errno.ELOOP:
        return "symbolic link loop (the links point at each other)"
    if err.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symbolic link (its target {os.readlink(path)} does not exist)"
    return err.strerror or str(err)


def check_regular_file(path: str | Path) -> os.stat_result:
    """``os.stat`` of ``path`` (following links), refusing anything but a regular file.

    Raises:
        OSError: the path is missing, a dangling or looping link, or unreadable.
        NotRegularFileError: it is a FIFO, socket, device or folder.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        # OSError(errno, ...) builds the matching subclass (FileNotFoundError, ...) with clearer words.
        raise OSError(err.errno, stat_error_reason(path, err), str(path)) from err
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{path} is {file_kind(st.st_mode)}, not a regular file")
    return st


def load_grayscale(path: str | Path, image_size: int) -> np.ndarray:
    """Decode ``path`` (JPEG or PNG, grayscale, RGB or 16-bit, any size) to ``(image_size, image_size)`` uint8.

    The image is squashed to a square without keeping its aspect ratio, as the study (and most
    pipelines for this dataset) did, with an antialiased bilinear filter, and turned upright by its
    EXIF orientation tag, as image viewers show it.

    Transparency (an alpha band as in RGBA, LA and PA, or a ``transparency`` entry as in P, L or
    RGB PNGs) is flattened by compositing over black, ``gray * alpha / 255``, at full size before
    resizing: black is an X-ray's "no signal" (air, outside the detector), and the colour a
    transparent pixel happens to store is arbitrary, so dropping the alpha band would let hidden
    values through. 16-bit images are stretched between the 0.1st and 99.9th percentiles of their
    (partly) opaque pixels.

    Raises:
        OSError: the file is unreadable or not an image (PIL's ``UnidentifiedImageError``
            included), is a dangling or looping link, or is not a regular file
            (:class:`NotRegularFileError`; it is never opened).
        ValueError: the image is too large (:class:`ImageTooLargeError`) or too small
            (:class:`ImageTooSmallError`) to be an X-ray.
    """
    check_regular_file(path)
    # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening returns at once instead
    # of waiting for a writer; the fstat below then refuses it. It changes nothing for regular files.
    with open(path, "rb", opener=_open_nonblocking) as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"{path} is {file_kind(mode)}, not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                # Only the formats the file names promise: PIL would otherwise open any of its
                # dozens of formats (TIFF with NaNs, EPS through Ghostscript, ...).
                img = Image.open(file, formats=("JPEG", "PNG"))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise ImageTooLargeError(f"{path}: {err}") from err
        with img:
            orientation = _exif_orientation(img)
            square = _to_square_gray(img, path, image_size)
    return _upright(square, orientation)


# EXIF orientation -> the transpose that shows the image upright (as ``ImageOps.exif_transpose``).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored); 1 when absent or unreadable."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block must not make a readable image unreadable
        return 1
    return orientation if isinstance(orientation, int) else 1


def _upright(square: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded square the way every viewer shows the file (a phone photo of a film, a
    scanner's export): rotating or flipping the squashed square equals squashing the turned image."""
    transpose = _UPRIGHT.get(orientation)
    if transpose is None:
        return square
    return np.asarray(Image.fromarray(square).transpose(transpose), dtype=np.uint8)


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)


def _to_square_gray(img: Image.Image, path: str | Path, image_size: int) -> np.ndarray:
    width, height = img.size
    # Checked on the header alone, before any pixel is decoded.
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{path} is {width}x{height} pixels, over the limit of {MAX_PIXELS:,} "
            f"(image_io.MAX_PIXELS); not decoded"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(
            f"{path} is {width}x{height} pixels; an X-ray needs at least {MIN_SIDE} on each side "
            f"(image_io.MIN_SIDE)"
        )
    # JPEG's DCT scaling decodes big originals at 1/2..1/8 size straight away: much faster.
    img.draft("L", (image_size, image_size))
    if img.mode in _WIDE_MODES:
        values = np.asarray(img, dtype=np.float32)
        alpha = _wide_alpha(img, values)
        opaque = values[alpha > 0] if alpha is not None else values
        low = high = 0.0
        if opaque.size:
            # Between the 0.1st and 99.9th percentiles, not min..max: one hot or dead pixel (a
            # detector defect, a burned-in marker at full scale) would squeeze the X-ray itself
            # into a few grey levels.
            low, high = (float(v) for v in np.percentile(opaque, STRETCH_PERCENTILES))
            if high <= low:  # nearly every pixel one value: stretch over them all
                low, high = float(opaque.min()), float(opaque.max())
        gray = (
            np.clip((values - low) * (255.0 / (high - low)), 0, 255) if high > low else values * 0
        )
    elif "A" in img.getbands() or "transparency" in img.info:
        # Through RGBA: PIL turns every kind of transparency (alpha band, one transparent value,
        # a palette's alpha table) into an alpha band there, and RGBA -> L is exact for grays.
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        gray = np.asarray(rgba.convert("L"), dtype=np.float32)
    else:
        return _resize(img if img.mode == "L" else img.convert("L"), image_size)
    if alpha is not None:
        gray = gray * (alpha.astype(np.float32) / 255.0)
    return _resize(Image.fromarray(gray.round().astype(np.uint8)), image_size)


def _wide_alpha(img: Image.Image, values: np.ndarray) -> np.ndarray | None:
    """Opacity (uint8, 255 = opaque) of a 16-bit or float image, which can only name one
    transparent value; None if it names none."""
    transparent = img.info.get("transparency")
    if not isinstance(transparent, (int, float)):
        return None
    # Not PIL's convert("RGBA"): it clips to 8 bits before comparing, so nothing matches.
    return np.where(values == transparent, 0, 255).astype(np.uint8)


def _resize(img: Image.Image, image_size: int) -> np.ndarray:
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_or_reason(path: str | Path, image_size: int) -> np.ndarray | str:
    """:func:`load_grayscale`'s image, or why ``path`` cannot be read (never raises for a bad file).

    Broad on purpose: one odd file must never stop a run. :func:`load_grayscale` turns the known
    cases into ``OSError`` or ``ValueError``, but PIL's plugins raise many other types on malformed
    input (``struct.error``, ``IndexError``, ``EOFError``, ``MemoryError``, ...). The type is kept
    in the reason, so a bug that fails every file shows as the same error on every file.
    """
    try:
        return load_grayscale(path, image_size)
    except UnidentifiedImageError:
        # PIL's own words name an internal file object; say what the file is instead.
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        return "UnidentifiedImageError: " + (
            "an empty file" if empty else "not a JPEG or PNG image"
        )
    except Exception as err:
        return f"{type(err).__name__}: {err}"
