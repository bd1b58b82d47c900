"""What produced a benchmark's numbers, written into its JSON and printed above its table: the
skinclf, torch and Python versions, the digest of skinclf's code (source), the machine, and the
commit of this checkout, so that a figure quoted in the README can be traced to the code it was
measured on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

import skinclf
from skinclf.training.environment import describe_environment, run_environment

CHECKOUT = Path(__file__).resolve().parents[1]


def provenance(device: torch.device) -> dict[str, str | None]:
    return {**run_environment(device), "commit": checkout_commit()}


def describe(record: dict[str, str | None]) -> str:
    """One line of :func:`provenance`'s record, as a run's log gives its versions and machine."""
    version = f"{record['skinclf']} at {record['commit']}" if record["commit"] else record["skinclf"]
    return describe_environment({**record, "skinclf": version})


def checkout_commit() -> str | None:
    """This checkout's commit, with "+changes" where tracked files differ from it, when the skinclf
    being measured is this checkout's own (an editable install); None for an installed copy
    (`pip install .` measures the code as it was then), outside a git checkout, or without git."""
    if not Path(skinclf.__file__).resolve().is_relative_to(CHECKOUT / "src"):
        return None
    try:
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != CHECKOUT:
            return None  # a copy of the project inside another repository
        commit = _git("rev-parse", "--short", "HEAD")
        changes = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changes else "")


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()
