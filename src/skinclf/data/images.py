"""Decoding one image file of any common kind into the uint8 RGB tensor every model takes."""

from __future__ import annotations

import io
import re
import struct
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from skinclf import IMAGE_SIZE
from skinclf.errors import SkinclfError, first_line

# Grayscale modes with more than 8 bits per pixel (16-bit PNG opens as I;16 or I): scaled, not clipped.
_WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}

# We refuse images over Image.MAX_IMAGE_PIXELS ourselves (see _check_pixel_count) with a clear
# error, so PIL's own warning for the same images would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Likewise a first EXIF directory cut short (_check_exif_directory); PIL's warning names no file.
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)


def _check_pixel_count(path: Path, img: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise SkinclfError(
            f"{path}: refused as a possible decompression bomb: {img.width}x{img.height} pixels is over "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}; expected a dermoscopic photo, shrink it first"
        )


def _check_float_range(path: Path, pixels: np.ndarray) -> None:
    """Float images are read on the usual float scale, 0 = black and 1 = white (scikit-image,
    OpenCV, ImageJ's normalised exports). One on another scale (0-255, raw counts) would
    otherwise come out black or white without a word, so it is refused instead."""
    # Half a grey level of slack either side: such values round into range anyway.
    slack = 0.5 / 255
    low, high = float(np.min(pixels)), float(np.max(pixels))
    if not (-slack <= low and high <= 1 + slack):  # also catches NaN
        raise SkinclfError(
            f"{path}: a floating-point image with values from {low:g} to {high:g}; expected values "
            "from 0 (black) to 1 (white); save it as an 8- or 16-bit image first"
        )


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, keeping the full tonal range of 16-bit grayscale; a
    floating-point image read on the 0-1 scale (``path`` names it if it is on another)."""
    if img.mode in _WIDE_GRAY_MODES:
        # PIL's own I;16 -> L conversion clips at 255, which turns most 16-bit images white.
        arr = np.asarray(img, dtype=np.float64)
        # A fixed scale, never one read from the pixels: a dark 16-bit image must stay darker
        # than a bright one. "I" is how PIL opens 16-bit PNGs too (32-bit TIFFs clip at white).
        if img.mode == "F":
            _check_float_range(path, arr)
        peak = 1.0 if img.mode == "F" else 65535.0
        gray = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # direct P -> RGB warns about byte transparency
    # RGBA/LA/PA: the alpha channel is dropped and the colour under it kept (no compositing:
    # a dermoscopic image with alpha is an export artefact, its colours are the lesion's).
    return img if img.mode == "RGB" else img.convert("RGB")


# Within a scan's entropy-coded data an FF byte is followed by 00 (a stuffed FF), a restart
# marker (D0-D7) or another FF (fill): anything else is the marker that ends the scan.
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Markers without a length field: TEM, the restart markers, and SOI.
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8), 0xD8}


def _jpeg_ends(data: bytes) -> bool:
    """Whether the JPEG in ``data`` reaches its end-of-image marker (FF D9): its segments walked by
    their lengths, each scan to the marker that ends it. Whatever follows the end marker (a phone's
    motion-photo video, an MPO's further images, padding) is not looked at. A structure this walk
    cannot follow counts as ended: judging it is PIL's decoder's job."""
    pos = 2  # after the start-of-image marker
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return True  # not where a marker should be: not this check's to judge
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if pos + 4 > len(data):
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            end = _MARKER_AFTER_SCAN.search(data, pos)
            if end is None:
                return False
            pos = end.start()
    return False


def _check_jpeg_end(path: Path, data: bytes) -> None:
    """A JPEG must reach its end-of-image marker. A download cut short and padded with zeros (a
    preallocated file) decodes without an error, as the top of the picture over flat grey."""
    if not _jpeg_ends(data):
        raise SkinclfError(
            f"{path}: corrupt or truncated image (its JPEG data ends before its end-of-image "
            "marker); expected a readable image"
        )


def _check_exif_directory(path: Path, img: Image.Image) -> None:
    """An EXIF block whose first directory, where the orientation tag is, is cut short: PIL reads
    the tags that fit, warns once per process without naming the file, and the image counts as
    upright whatever its tag said."""
    data = img.info.get("exif")
    if not isinstance(data, bytes):
        return
    data = data.removeprefix(b"Exif\x00\x00")
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        return  # no TIFF header: PIL's parser refuses it (see _apply_exif_orientation)
    order = "<" if data[:2] == b"II" else ">"
    (start,) = struct.unpack_from(order + "L", data, 4)
    if start == len(data):
        return  # a header without a directory: no orientation tag to lose
    # The directory: a 2-byte entry count, then 12 bytes an entry.
    if start + 2 <= len(data):
        (entries,) = struct.unpack_from(order + "H", data, start)
        if start + 2 + 12 * entries <= len(data):
            return
    raise SkinclfError(
        f"{path}: damaged EXIF metadata (its first directory is cut short, so the orientation tag may "
        "be lost); expected a readable orientation tag (re-save the image without EXIF to use it)"
    )


def _apply_exif_orientation(img: Image.Image, path: Path) -> Image.Image:
    """The image turned as its EXIF orientation says. A damaged EXIF block makes PIL's parser fail
    with whatever its bytes lead to (struct.error, TypeError, ...), or, cut short, lose the tags
    past the cut (:func:`_check_exif_directory`); its orientation is then unknown, and a guess
    would train on a turned image without a word."""
    _check_exif_directory(path, img)
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:
        raise SkinclfError(_damaged_exif(path, err)) from err


def _read_exif(img: Image.Image, path: Path) -> None:
    """Read (and keep on ``img``) a TIFF's EXIF block while the file is open: Pillow 10.0 closes a
    multi-page TIFF's file at ``load()``, after which reading the block failed. (Not for other
    formats: a PNG's read loads the image, and a truncated one would pass for damaged EXIF.)"""
    try:
        img.getexif()
    except Exception as err:  # the parser fails on damaged bytes with any type (see above)
        raise SkinclfError(_damaged_exif(path, err)) from err


def _damaged_exif(path: Path, err: Exception) -> str:
    return (
        f"{path}: damaged EXIF metadata ({first_line(err)}); expected a readable orientation tag "
        "(re-save the image without EXIF to use it)"
    )


@cache
def image_file_suffixes() -> frozenset[str]:
    """The file suffixes of the formats Pillow opens, which :func:`decode_image` reads (.jpg,
    .png, .tif, .webp, ...): what a file named so is taken to be."""
    return frozenset(ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN)


def decode_image(path: str | Path, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Decode the image at ``path`` into a uint8 tensor of shape (3, size, size), RGB.

    - Any mode PIL reads: RGB, RGBA/LA (alpha dropped), L, P (palette, with or without
      transparency), CMYK, 16-bit grayscale PNG (I;16 / I, scaled 0-65535 -> 0-255, not clipped),
      floating-point grayscale TIFF (F, 0-1 -> 0-255; values outside 0-1 are refused).
    - EXIF orientation is applied first, so a phone photo stored sideways comes out upright.
    - The whole image is resized to ``size`` x ``size`` (antialiased bilinear; the aspect ratio is
      not kept, so no part of the lesion is cropped away, as in MedMNIST). Large JPEGs are
      decoded at a reduced DCT scale first (PIL draft mode), which is much faster and still at
      least ``size`` pixels on each side.
    - Images over ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bombs) are refused.

    Raises :class:`SkinclfError` naming ``path`` when the file is missing, is not an image, is
    corrupt or truncated, or is too large. The tensor is a view of HWC memory (channels-last).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if not data:  # an upload or copy that never got its bytes
            raise SkinclfError(f"{path}: an empty file (0 bytes); expected an image")
        with Image.open(io.BytesIO(data)) as img:
            _check_pixel_count(path, img)
            if img.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with more images appended
                _check_jpeg_end(path, data)
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            if img.format == "TIFF":
                _read_exif(img, path)
            img.load()  # decode everything now: a truncated file fails here, not later
            img = _apply_exif_orientation(img, path)
            img = _to_rgb(img, path)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            arr = np.array(img, dtype=np.uint8)  # a writable copy, owned by the tensor
    except SkinclfError:
        raise
    except FileNotFoundError as err:
        raise SkinclfError(f"{path}: no such image file") from err
    except IsADirectoryError as err:
        raise SkinclfError(f"{path}: is a folder; expected an image file") from err
    except UnidentifiedImageError as err:
        raise SkinclfError(f"{path}: not an image file PIL can read (expected JPEG, PNG, ...)") from err
    except Image.DecompressionBombError as err:
        raise SkinclfError(
            f"{path}: refused as a possible decompression bomb ({err}); expected a dermoscopic photo"
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as err:
        # PIL's plugins report truncated or malformed data with any of these types.
        raise SkinclfError(f"{path}: corrupt or truncated image ({err}); expected a readable image") from err
    if arr.shape != (size, size, 3):
        raise SkinclfError(f"{path}: decoded to shape {arr.shape}; expected ({size}, {size}, 3)")
    return torch.from_numpy(arr).permute(2, 0, 1)
