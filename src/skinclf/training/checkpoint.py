"""Checkpoints: written atomically, read back with ``weights_only=True`` (no code execution)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from skinclf.errors import SkinclfError, first_line
from skinclf.io import atomic_torch_save

FORMAT = "skinclf-checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Save ``state`` (model, optimizer, epoch, config, ...) atomically, tagged with our format."""
    atomic_torch_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a skinclf checkpoint safely; anything else is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise SkinclfError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise SkinclfError(f"{path}: not a readable skinclf checkpoint ({first_line(err)})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SkinclfError(f"{path}: not a skinclf checkpoint (expected format {FORMAT!r})")
    return state
