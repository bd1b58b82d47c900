"""Finding run folders and reading what ``skinclf train`` left in them.

A run folder is any folder with a ``.hydra/config.yaml`` of a skinclf training config (grid-search
points, which cross-validate on the training split and are never tested, are not runs). Its status:
``finished`` (``test_metrics.json`` exists; the trainer writes it last), ``unfinished`` (still
running, stopped by Ctrl-C or a signal, or killed outright) or ``failed`` (its files cannot be
read, or its ``job_status.json`` says it stopped with an error).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from skinclf.config import compose_config
from skinclf.errors import SkinclfError, counted
from skinclf.run_files import HYDRA_CONFIG, HYDRA_OVERRIDES, METRICS, PREDICTIONS, TEST_METRICS
from skinclf.sweep.jobs import STATUS_FILE, process_gone

FINISHED, UNFINISHED, FAILED = "finished", "unfinished", "failed"
# How an interrupted run (stopped, or killed outright) goes on.
RESUME_HINT = "resume=true, or re-launching its sweep, continues it"

METRICS_REQUIRED = ("epoch", "train_acc", "val_acc")
TEST_REQUIRED = ("accuracy", "f1", "sensitivity", "specificity", "roc_auc", "confusion")

# Overrides that change where or how fast a run happens, not what it measures: runs that differ
# only in these are repetitions of the same experiment. The seed is the repetition axis itself;
# model and dataset are reported in their own columns.
NOT_AN_EXPERIMENT_SETTING = frozenset(
    {
        "seed",
        "model",
        "data",
        "data.root",
        "data.cache_dir",
        "device",
        "resume",
        "trainer.progress",
        "trainer.precision",
        "trainer.channels_last",
        "trainer.eval_batch_size",
    }
)


@dataclass
class Run:
    """One run folder: its identity (model, dataset, seed, settings) and its results."""

    path: Path
    model: str
    data: str
    seed: int | None
    settings: dict[str, str] = field(default_factory=dict)
    status: str = UNFINISHED
    problem: str = ""
    history: pd.DataFrame | None = None
    test: dict | None = None

    @property
    def best_epoch(self) -> int | None:
        """First epoch with the highest validation accuracy: the one the trainer checkpoints as best."""
        if self.history is None or self.history.empty:
            return None
        return int(self.history["epoch"].iloc[int(np.argmax(self.history["val_acc"].to_numpy()))])

    @property
    def tested(self) -> bool:
        """Finished with a test split (datasets without one end after validation)."""
        return self.status == FINISHED and bool(self.test) and int(self.test.get("n_test", 0)) > 0

    def test_predictions(self) -> pd.DataFrame | None:
        """The test rows of predictions.csv (``label``, ``prob_mel``), or None when absent."""
        path = self.path / PREDICTIONS
        if not path.is_file():
            return None
        try:
            frame = pd.read_csv(path)
            return frame.loc[frame["split"] == "test", ["label", "prob_mel"]].reset_index(drop=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, UnicodeDecodeError) as err:
            raise SkinclfError(
                f"{path}: unreadable ({err}); expected columns split,index,label,prob_mel"
            ) from err


def describe_dataset(data: str) -> str:
    """The dataset's name as shown in table headers and figure titles; the synthetic data says so."""
    if data == "synthetic":
        return "synthetic data (procedurally generated, not real lesions)"
    return f"{data} data"


def find_runs(dirs: Sequence[Path]) -> list[Run]:
    """All skinclf run folders under ``dirs`` (each a run or multirun folder), sorted by path."""
    seen: dict[Path, Path] = {}
    for root in map(Path, dirs):
        if not root.is_dir():
            continue
        for config in root.rglob(str(HYDRA_CONFIG)):
            seen.setdefault(config.parent.parent.resolve(), config.parent.parent)
    runs = [load_run(seen[key]) for key in sorted(seen)]
    return [run for run in runs if run is not None]


def load_run(path: Path) -> Run | None:
    """Read one run folder; None when its config is not a skinclf training config."""
    try:
        cfg = OmegaConf.load(path / HYDRA_CONFIG)
    except Exception as err:  # any YAML problem: the folder is listed as failed, not skipped
        return Run(path, "?", "?", None, status=FAILED, problem=f"{HYDRA_CONFIG} unreadable: {err}")
    if not isinstance(cfg, DictConfig):
        return None
    model = OmegaConf.select(cfg, "model.name", default=None)
    data_name = OmegaConf.select(cfg, "data.name", default=None)
    if model is None or data_name is None:
        return None  # another Hydra application's output
    if OmegaConf.select(cfg, "cv.folds", default=None):
        return None  # a grid-search point: cross-validated, never tested; see its grid_search.md
    root = OmegaConf.select(cfg, "data.root", default=None)
    # Two folder datasets are different datasets: the root is part of the identity.
    data = f"{data_name}:{root}" if root else str(data_name)
    seed = OmegaConf.select(cfg, "seed", default=None)
    run = Run(path, str(model), data, None if seed is None else int(seed), _settings(path))

    try:
        run.history = _read_history(path / METRICS)
        test_path = path / TEST_METRICS
        if test_path.is_file():
            try:
                run.test = json.loads(test_path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{TEST_METRICS} is not valid JSON ({err})") from err
            if not isinstance(run.test, dict):
                raise ValueError(f"{TEST_METRICS}: expected a JSON object")
            missing = [key for key in TEST_REQUIRED if key not in run.test]
            if run.test.get("n_test", 0) and missing:
                raise ValueError(f"{TEST_METRICS} lacks {', '.join(missing)}")
            if run.history is None or run.history.empty:
                raise ValueError(f"{TEST_METRICS} exists but {METRICS} has no epochs")
            run.status = FINISHED
        else:
            n = 0 if run.history is None else len(run.history)
            epochs = counted(n, "epoch")
            status = _job_status(path)
            if status.get("status") == "failed":
                error = status.get("error", "no error recorded")
                run.status, run.problem = FAILED, f"failed after {epochs}: {error}"
            elif status.get("status") == "stopped":
                run.problem = f"stopped after {epochs} (Ctrl-C or a signal): {RESUME_HINT}"
            elif status.get("status") == "running" and process_gone(status):
                run.problem = (
                    f"killed after {epochs}: its process ({status['pid']}) ended without recording "
                    f"why (SIGKILL, out of memory?); {RESUME_HINT}"
                )
            else:
                run.problem = f"no {TEST_METRICS} ({epochs} done)"
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        run.status, run.problem = FAILED, str(err)
    return run


def _job_status(path: Path) -> dict:
    """The run's or sweep job's job_status.json; empty when it has none or it is unreadable."""
    try:
        status = json.loads((path / STATUS_FILE).read_text())
    except (OSError, ValueError):  # runs from before status files, or a torn copy: nothing to add
        return {}
    return status if isinstance(status, dict) else {}


def _read_history(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        history = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(METRICS_REQUIRED))
    missing = [c for c in METRICS_REQUIRED if c not in history.columns]
    if missing:
        raise ValueError(f"{METRICS} lacks columns {missing}")
    return history.sort_values("epoch").reset_index(drop=True)


@cache
def _default_group_choices() -> dict[str, str]:
    """The config groups' default choices (recipe: paper, ...), as `skinclf train` composes them."""
    choices = compose_config([], return_hydra_config=True).hydra.runtime.choices
    return {str(group): str(choice) for group, choice in choices.items() if choice is not None}


def _settings(path: Path) -> dict[str, str]:
    """The run's command-line overrides that define the experiment (see NOT_AN_EXPERIMENT_SETTING)."""
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path / HYDRA_OVERRIDES))
    except Exception:  # no or broken overrides.yaml: the run counts as run with the defaults
        return {}
    if not isinstance(overrides, list):
        return {}
    settings = {}
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if value in ("True", "False"):  # Hydra's multirun writes a swept `false` back as `False`
            value = value.lower()
        if key in NOT_AN_EXPERIMENT_SETTING or key.startswith("hydra."):
            continue
        if _default_group_choices().get(key) == value:
            continue  # `recipe=paper` spelled out is the default run, not another setting
        settings[key] = value
    return settings
