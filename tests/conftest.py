"""Shared test helpers: tiny configs and runs of the real training code on synthetic data."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from PIL import Image

from skinclf.config import compose_config
from skinclf.io import readable
from skinclf.models.simple_cnn import SimpleCNN

# Small enough for a 2-core CPU, large enough to learn something.
TINY = ["data.train_size=64", "data.val_size=32", "data.test_size=32", "trainer.max_epochs=1"]


def train_cli(*overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``skinclf train OVERRIDES`` from folder ``cwd`` as a user would, but in this process:
    the command line, Hydra, the exit code and the printed output are the real ones, without the
    5 s of importing torch that a new process pays (tests of signals and --help use their own).

    What a run changes in the process is put back afterwards: the working folder, torch's thread
    count, and the log handlers Hydra attaches (the console and the run's train.log)."""
    from skinclf import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(), logging.getLogger("skinclf")]
    handlers = [list(logger.handlers) for logger in loggers]
    levels = [logger.level for logger in loggers]
    threads, folder = torch.get_num_threads(), os.getcwd()
    os.chdir(cwd)
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            pytest.MonkeyPatch.context() as env,
        ):
            env.setenv("HYDRA_FULL_ERROR", "0")
            try:
                cli.main(["train", *overrides])
                returncode = 0
            except SystemExit as stop:
                returncode = _exit_status(stop.code)
            except Exception:  # what the interpreter does with an uncaught error
                traceback.print_exc()
                returncode = 1
    finally:
        os.chdir(folder)
        torch.set_num_threads(threads)
        for logger, kept, level in zip(loggers, handlers, levels, strict=True):
            for handler in [h for h in logger.handlers if h not in kept]:
                logger.removeHandler(handler)
                handler.close()
            for handler in [h for h in kept if h not in logger.handlers]:
                logger.addHandler(handler)
            logger.setLevel(level)
    proc = subprocess.CompletedProcess(
        ["skinclf", "train", *overrides], returncode, stdout.getvalue(), stderr.getvalue()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"skinclf train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _exit_status(code: object) -> int:
    """The process exit status ``sys.exit(code)`` gives: a message is printed and exits 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


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


def another_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``run_dir``'s files without its checkpoints (MBs that no test here reads), and a
    grid-search point's fold folder: another skinclf run, whose files an --out must leave alone."""
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("*.pt"))
    (other / "fold_0").mkdir()
    (other / "fold_0" / "metrics.csv").write_text((other / "metrics.csv").read_text())
    return other


def files_of(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` and its bytes: what a refused command must leave as it was."""
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


class SimpleCNNKilledAtSeed(SimpleCNN):
    """The baseline model (``model.arch._target_=conftest.SimpleCNNKilledAtSeed``), except in a
    run whose seed is ``kill_seed``: its process gets ``signum``, by default killed outright as
    the out-of-memory killer does (SIGKILL: nothing is recorded, no ``finally`` runs)."""

    def __init__(self, kill_seed: int, seed: int, signum: int = signal.SIGKILL, **arch) -> None:
        if seed == kill_seed:
            os.kill(os.getpid(), signum)
        super().__init__(**arch)


class SimpleCNNWaitingAtSeed(SimpleCNN):
    """The baseline model (``model.arch._target_=conftest.SimpleCNNWaitingAtSeed``), except in a
    run whose seed is ``wait_seed``: that one is built only once the path ``wait_for`` exists
    (another sweep job's folder: that job has started), or after 120 s."""

    def __init__(self, wait_seed: int, seed: int, wait_for: str, **arch) -> None:
        deadline = time.monotonic() + 120
        while seed == wait_seed and not Path(wait_for).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        super().__init__(**arch)


class KilledAtJobStart(Callback):
    """A Hydra callback (``+hydra.callbacks.killer._target_=conftest.KilledAtJobStart``) that
    kills the process of the sweep job whose seed is ``seed`` as it starts, before skinclf has
    recorded anything of it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.seed == self.seed:
            os.kill(os.getpid(), signal.SIGKILL)


def batches_by_warp_chunk(monkeypatch: pytest.MonkeyPatch, train_batch) -> list[torch.Tensor]:
    """``train_batch()`` with the augmentation warping the whole batch of 50, then chunks of 8
    and of 3 (the last one partial): the batch the caller compares the chunked ones with first."""
    import skinclf.data.pipeline as pipeline_module

    batches = []
    for chunk in (50, 8, 3):
        monkeypatch.setattr(pipeline_module, "WARP_CHUNK", chunk)
        batches.append(train_batch())
    return batches


def users_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str) -> Path:
    """A module of the user's own, ``name``.py, importable (its folder on the path)."""
    code = tmp_path / "my_code"
    code.mkdir(exist_ok=True)
    (code / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(code))
    return code


# Models of the user's own that PyTorch's meta device cannot run, which train and summary must
# still take: they are run for real on the CPU instead, or left to the run.
MODELS_THE_META_DEVICE_CANNOT_RUN = """
import torch
import torch.nn as nn


class CropsToTheLesion(nn.Module):  # data-dependent: fails on meta, and on blank images
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        rows = torch.nonzero(x.mean(dim=(0, 1)) > 0.5)[:, 0]
        return self.head(x[:, :, rows.min() : rows.max() + 1].mean(dim=(2, 3)))


class NoCpuKernel(nn.Linear):  # an op the CPU has no kernel for (a CUDA-only extension)
    def __init__(self):
        super().__init__(3, 1)

    def forward(self, x):
        raise NotImplementedError("Could not run 'ext::op' with arguments from the 'CPU' backend")
"""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A report's text as valid UTF-8: tests of file names whose bytes are no UTF-8 print them as
    they are, and pytest-xdist cannot send such text from a worker (the whole run ended in an
    INTERNALERROR, a failure's message lost). Shown escaped (``\\xff``), as skinclf's titles show
    them; a failure's message is then plain text (pytest's own layout of it is kept otherwise)."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, _valid_text(content)) for title, content in report.sections]
    if report.failed and _valid_text(str(report.longrepr)) != str(report.longrepr):
        report.longrepr = _valid_text(str(report.longrepr))


def _valid_text(text: str) -> str:
    try:
        return readable(text)  # a file name's bytes, as Python keeps them (surrogate escapes)
    except UnicodeEncodeError:  # any other lone surrogate
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
