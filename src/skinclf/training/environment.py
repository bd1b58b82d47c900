"""What produced a run's numbers, recorded with them (test_metrics.json; a grid-search point's
cv_result.json and its folds' fold_result.json; checkpoints): skinclf's version and a digest of
its code, the torch and Python versions, the machine; and, across resumes, each environment the
run's epochs trained in."""

from __future__ import annotations

import hashlib
import logging
import platform
import reprlib
from collections.abc import Iterator, Mapping
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch

from skinclf import __version__
from skinclf.config import is_count
from skinclf.errors import SkinclfError
from skinclf.training.checkpoint import load_checkpoint
from skinclf.training.hardware import describe_machine
from skinclf.training.loop import EarlyStopping

log = logging.getLogger("skinclf")

# What stands for the environment of epochs (or a finished fold) that an older skinclf trained
# without recording it; copied wherever it is used.
UNKNOWN = {"unknown": True}


def run_environment(device: torch.device) -> dict[str, str]:
    """What produced a run's results, recorded with them (test_metrics.json): the versions that
    decide its numbers and the machine that decides its speed (metrics.csv's seconds)."""
    return {
        "skinclf": __version__,
        "source": source_digest(),
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "python": platform.python_version(),
        "machine": describe_machine(device),
    }


def describe_environment(environment: Mapping[str, str]) -> str:
    """:func:`run_environment`'s record as one line:
    "skinclf 0.1.0 (source 0123456789ab), torch 2.6.0, Python 3.12.3; MACHINE"."""
    return (
        f"skinclf {environment['skinclf']} (source {environment['source']}), torch {environment['torch']}, "
        f"Python {environment['python']}; {environment['machine']}"
    )


@cache
def source_digest() -> str:
    """The first 12 hex digits of a SHA-256 over skinclf's own code and configs: each .py and .yaml
    file's path inside the package and its bytes. The version number stays the same between
    changes; this tells the code that produced a run apart, installed or editable (where the
    configs lie outside the package, in the checkout's conf/), or imported from a zip. Hidden
    files (an editor's lock file) and symlinks are left out; "unknown" where the files cannot be
    read."""
    digest = hashlib.sha256()
    try:
        for package in ("skinclf", "skinclf.conf"):
            # An installed package holds its configs in skinclf/conf: they count as skinclf.conf.
            skip = {"conf"} if package == "skinclf" else set()
            for name, file in _source_files(files(package), f"{package}/", skip):
                digest.update(f"{name}\0".encode())
                digest.update(file.read_bytes())
                digest.update(b"\0")
    except OSError:
        return "unknown"
    return digest.hexdigest()[:12]


def _source_files(folder: Traversable, prefix: str, skip: set[str]) -> Iterator[tuple[str, Traversable]]:
    """The .py and .yaml files under ``folder`` in name order, with their paths from the package.
    Symlinks are not followed: a link back up the tree would walk it again and again."""
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        # zipfile.Path has is_symlink only from Python 3.12; a zip holds none.
        linked = getattr(entry, "is_symlink", None)
        if entry.name.startswith(".") or entry.name in skip or (linked is not None and linked()):
            continue
        if entry.is_dir():
            yield from _source_files(entry, f"{prefix}{entry.name}/", set())
        elif entry.is_file() and entry.name.endswith((".py", ".yaml")):
            yield f"{prefix}{entry.name}", entry


def environment_history(
    last: Path, environment: dict[str, Any], resume: bool, max_epochs: int, record: str, tested: bool
) -> list[dict[str, Any]]:
    """Each environment a run (or grid-search fold) trained in, with the epoch it began at
    (``from_epoch``): one, unless a resume from ``last`` goes on in another (machine, thread
    count, versions, code), which is said, naming ``record``, the file that will list them. One
    that begins after the last epoch trains nothing (a run only ``tested`` there). Epochs of a
    last.pt written before skinclf recorded this are of an unknown environment (:data:`UNKNOWN`)."""
    here = [{"from_epoch": 1, **environment}]
    if not (resume and last.is_file()):
        return here
    state = load_checkpoint(last, mmap=True)
    epoch, history = state.get("epoch"), state.get("environments", [])
    if not (
        is_count(epoch) and epoch >= 1 and isinstance(history, list) and all(map(_is_environment, history))
    ):
        raise SkinclfError(
            f"{last}: its epoch or record of environments is damaged (epoch {reprlib.repr(epoch)}, "
            f"environments {reprlib.repr(history)}); expected the last.pt this run wrote"
        )
    history = history or [{"from_epoch": 1, **UNKNOWN}]
    before = {key: value for key, value in history[-1].items() if key != "from_epoch"}
    if before == environment:
        return history
    first = history[-1]["from_epoch"]
    trained = f"epoch {epoch} was" if first == epoch else f"epochs {first}-{epoch} were"
    if before == UNKNOWN:
        where = f"{trained} trained by a skinclf that did not record where"
    else:
        changed = [
            f"{key} {before.get(key)!r} -> {environment.get(key)!r}"
            for key in sorted(before.keys() | environment.keys())
            if before.get(key) != environment.get(key)
        ]
        where = f"{trained} trained in another environment ({'; '.join(changed)})"
    if epoch >= max_epochs or _stopped_early(state):
        rest = "only the test runs in this one" if tested else "no epoch is left to train in this one"
        log.warning(f"{last}: {where}; {rest} ({record} lists each)")
    else:
        # Another thread count or CPU sums in another order: the numbers may differ (README).
        log.warning(
            f"{last}: {where}; the rest train in this one, and the numbers may differ from an "
            f"uninterrupted run's ({record} lists each)"
        )
    return [*history, {"from_epoch": epoch + 1, **environment}]


def recorded_environments(environment: dict[str, Any], environments: list[dict[str, Any]]) -> dict[str, Any]:
    """For a run's or fold's result file: where it ended, and each it trained in where several."""
    return {"environment": environment, **({"environments": environments} if len(environments) > 1 else {})}


def _stopped_early(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's early stopping had already ended its training (no epoch left)."""
    try:
        return EarlyStopping(**state["early_stopping"]).should_stop
    except (KeyError, TypeError):  # damaged: the loop's own resume names the problem
        return False


def _is_environment(entry: object) -> bool:
    """An entry of a checkpoint's ``environments``: a first epoch and JSON scalars (test_metrics.json)."""
    return (
        isinstance(entry, dict)
        and is_count(entry.get("from_epoch"))
        and entry["from_epoch"] >= 1
        and all(isinstance(key, str) and isinstance(value, str | bool | int) for key, value in entry.items())
    )
