"""Decode a list of image files once; later loads read one uint8 tensor file instead.

The cache of a list of files is keyed by its content as the file system reports it: every
file's path (relative to the dataset root), size, modification time (ns), status-change time
(ns), permission bits and owner, the output image size, the decoder version and Pillow's
version. Any added, removed, renamed, resized, touched, chmod-ed or chown-ed file (an image
skipped as unreadable, then made readable) changes the key, as does a Pillow upgrade (its JPEG
decoder may round differently), so a changed dataset is never served stale; the old cache file
is simply not used again. The status-change time, which no tool can set back, catches a file
replaced by one of the same size with its modification time copied over (``touch -r``, ``cp -p``,
``rsync -t``, an archive extracted again): the price is one more decode of a copied dataset.
Hashing the bytes instead would read the whole dataset on every run (full-size photos: GBs).
Cache files are written atomically (temporary file + rename), so an interrupted run leaves no
half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch

from skinclf.data.images import IMAGE_SIZE, decode_image
from skinclf.errors import SkinclfError
from skinclf.io import remove_stale_cache_temporaries, save_cache
from skinclf.training.progress import progress

log = logging.getLogger(__name__)

# Bump when decode_image's output changes (resampling, colour handling, what it refuses), to
# invalidate caches: a cache would otherwise keep serving an image the decoder now refuses.
# 2: 16-bit grayscale always scaled from 0-65535; 3: zero-padded JPEGs, EXIF cut short and empty
# files refused.
DECODER_VERSION = 3
# PIL releases the GIL while decoding and resizing, so threads decode in parallel: as many as
# torch's threads (this job's share of the cores when a sweep runs jobs side by side), at most 8.
_MAX_WORKERS = 8


def decode_threads() -> int:
    """Threads that decode images: torch's thread count, at most 8."""
    return max(1, min(_MAX_WORKERS, torch.get_num_threads()))


@dataclass
class Decoded:
    """Decoded images of ``files`` in order, minus the ``bad`` ones (path, reason) when skipped."""

    images: torch.Tensor  # uint8 (N, 3, H, W), channels-last memory
    kept: list[int]  # indices into the file list of the images in ``images``
    bad: list[tuple[str, str]] = field(default_factory=list)
    from_cache: bool = False
    cache_file: Path | None = None  # where these images are (or are to be) cached
    key: str = ""


def content_key(files: list[Path], root: Path, size: int = IMAGE_SIZE) -> str:
    """A hex digest of what decoding ``files`` depends on (see the module docstring)."""
    entries = []
    for path in files:
        try:
            # A dangling symlink keys on the link itself; decoding then reports (or skips) it.
            st = path.stat() if path.exists() else path.lstat()
        except OSError as err:
            raise SkinclfError(f"{path}: cannot read the file ({err.strerror})") from err
        entries.append(
            [
                path.relative_to(root).as_posix(),
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_mode,
                st.st_uid,
                st.st_gid,
            ]
        )
    decoder = {"decoder": DECODER_VERSION, "pillow": PIL.__version__, "size": size}
    blob = json.dumps({**decoder, "files": entries}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _decode_one(path: Path, size: int) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(path, size).permute(1, 2, 0).numpy(), ""
    except SkinclfError as err:
        return None, str(err)


def decode_files(
    files: list[Path], size: int = IMAGE_SIZE, skip_bad: bool = False, desc: str = "decoding"
) -> Decoded:
    """Decode ``files`` in parallel threads. A bad file raises its SkinclfError, or with
    ``skip_bad`` is left out and listed in ``Decoded.bad``."""
    out = np.empty((len(files), size, size, 3), np.uint8)
    kept: list[int] = []
    bad: list[tuple[str, str]] = []
    pool = ThreadPoolExecutor(decode_threads())
    try:
        results = pool.map(lambda p: _decode_one(p, size), files)
        for i, (arr, error) in enumerate(progress(results, total=len(files), desc=desc, unit="img")):
            if arr is None:
                if not skip_bad:
                    raise SkinclfError(f"{error} (data.skip_bad_images=true skips such files)")
                bad.append((str(files[i]), error))
                continue
            out[len(kept)] = arr
            kept.append(i)
    finally:
        # On the first bad file, do not decode the thousands still queued before reporting it.
        pool.shutdown(wait=True, cancel_futures=True)
    images = torch.from_numpy(out[: len(kept)]).permute(0, 3, 1, 2)  # NHWC storage = channels-last
    return Decoded(images, kept, bad)


def load_or_decode(
    files: list[Path],
    root: Path,
    cache_file_stem: str,
    cache_dir: Path | None,
    size: int = IMAGE_SIZE,
    skip_bad: bool = False,
) -> Decoded:
    """Decoded ``files`` from ``cache_dir/<stem>-<key>.pt`` when it exists, else decoded now.

    ``cache_dir=None`` disables the cache. A cache that cannot be read is decoded again. Newly
    decoded images are written to the cache only by :func:`store`, so that a caller can first
    check every split and leave no cache behind when one of them is bad.
    """
    key = content_key(files, root, size)
    cache = None if cache_dir is None else Path(cache_dir) / f"{cache_file_stem}-{key[:20]}.pt"
    if cache is not None:
        remove_stale_cache_temporaries(cache)
    decoded = _read_cache(cache, key, len(files)) if cache is not None else None
    if decoded is None:
        decoded = decode_files(files, size, skip_bad, desc=f"decoding {cache_file_stem}")
    elif decoded.bad and not skip_bad:
        # The cache was made with skip_bad_images=true: now the first bad file is an error again.
        raise SkinclfError(f"{decoded.bad[0][1]} (data.skip_bad_images=true skips such files)")
    decoded.cache_file, decoded.key = cache, key
    return decoded


def store(decoded: Decoded) -> None:
    """Write newly decoded images to their cache file (atomically); a no-op for cache hits.

    A cache that cannot be written is reported and skipped: training does not need it.
    """
    if decoded.from_cache or decoded.cache_file is None:
        return
    stored = {"key": decoded.key, "images": decoded.images, "kept": decoded.kept, "bad": decoded.bad}
    if save_cache(stored, decoded.cache_file, "the decode cache", "the next run decodes again"):
        log.info(f"decoded {len(decoded.kept)} images into cache {decoded.cache_file}")


def _read_cache(cache: Path, key: str, n_files: int) -> Decoded | None:
    if not cache.exists():
        return None
    try:
        stored = torch.load(cache, weights_only=True)
        images, kept = stored["images"], list(stored["kept"])
        if stored["key"] != key or len(images) != len(kept) or len(kept) > n_files:
            raise ValueError("content does not match its key")
    except Exception as err:  # any unreadable cache (old format, disk error) is just decoded again
        log.warning(f"ignoring unreadable decode cache {cache}: {err}")
        return None
    log.info(f"loaded {len(kept)} decoded images from cache {cache}")
    bad = [(str(p), str(m)) for p, m in stored["bad"]]
    return Decoded(images, kept, bad, from_cache=True)
