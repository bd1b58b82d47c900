"""Checkpoints: written atomically, read back with ``weights_only=True`` (no code execution)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from skinclf.errors import SkinclfError, first_line
from skinclf.io import atomic_link, atomic_torch_save, write_failure

FORMAT = "skinclf-checkpoint-v1"
# torch.save's format since torch 1.6 is a zip archive; any other file is refused before torch
# reads it (its legacy reader fails on text with a bare KeyError).
ZIP_MAGIC = b"PK\x03\x04"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Save ``state`` (model, optimizer, epoch, config, ...) atomically, tagged with our format."""
    _write(path, lambda: atomic_torch_save({"format": FORMAT, **state}, path))


def link_checkpoint(source: Path, path: Path) -> None:
    """Make ``path`` a second name of the checkpoint ``source`` (a copy where there are no hard
    links), atomically."""
    _write(path, lambda: atomic_link(source, path))


def _write(path: Path, write: Callable[[], None]) -> None:
    """``write()`` the checkpoint ``path``; one that fails (a full disk, a file size limit) is a
    SkinclfError naming the file and the space left. The file it replaces, if any, stays as it was."""
    try:
        write()
    except OSError as err:
        raise SkinclfError(write_failure(path, err)) from err


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a skinclf checkpoint safely; anything else is refused with a clear message. ``mmap``:
    tensors are read from disk only when used (for a look at a 1.3 GB last.pt's small entries)."""
    path = Path(path)
    if not path.is_file():
        raise SkinclfError(f"{path}: checkpoint not found")
    try:
        with path.open("rb") as file:
            if file.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                raise ValueError("not the zip archive that torch.save writes")
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        # weights_only runs no code from the file: what torch.load raises comes from damaged
        # bytes, as whichever error its reader or unpickler meets first (RuntimeError, KeyError,
        # IndexError, struct.error, UnicodeDecodeError, EOFError, ...), or from reading the file.
        raise SkinclfError(f"{path}: not a readable skinclf checkpoint ({first_line(err)})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SkinclfError(f"{path}: not a skinclf checkpoint (expected format {FORMAT!r})")
    return state
