"""Shared test helpers: tiny configs and runs of the real training code on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from skinclf.config import compose_config

# Small enough for a 2-core CPU, large enough to learn something.
TINY = ["data.train_size=64", "data.val_size=32", "data.test_size=32", "trainer.max_epochs=1"]


def train_cli(*overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``skinclf train OVERRIDES`` in a subprocess, as a user would."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "skinclf", "train", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"skinclf train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_dir_from_output(stdout: str) -> Path:
    """The run directory printed at the end of ``skinclf train``."""
    lines = [line for line in stdout.splitlines() if line.startswith("output directory: ")]
    assert lines, f"no output directory printed:\n{stdout}"
    return Path(lines[-1].removeprefix("output directory: "))


def train_in_process(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    """Run the training code in this process (faster than a subprocess); returns (run dir, metrics)."""
    from skinclf.train import run

    cfg = compose_config([f"data.cache_dir={tmp_path / 'data'}", "trainer.progress=never", *overrides])
    out_dir = tmp_path / "run"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = run(cfg, out_dir)
    assert json.loads((out_dir / "test_metrics.json").read_text()) == metrics
    return out_dir, metrics


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic-data cache for the whole session: generating images is not what tests test."""
    return tmp_path_factory.mktemp("data")


def fail_if_called(what: str):
    """A stand-in for ``what`` that fails the test when called: proof that a command refused its
    --out before starting that work."""

    def called(*args, **kwargs):
        raise AssertionError(f"{what} ran before --out was checked")

    return called


def image_and_kept_file(tmp_path: Path) -> tuple[Path, Path]:
    """A small image to process, and a file that an --out at it (or under it) must leave as it is."""
    image = tmp_path / "lesion.png"
    Image.new("RGB", (16, 16)).save(image)
    kept = tmp_path / "notes.txt"
    kept.write_text("keep me")
    return image, kept
