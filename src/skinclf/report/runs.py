"""Finding run folders and reading what ``skinclf train`` left in them.

A run folder is any folder with a ``.hydra/config.yaml`` of a skinclf training config (grid-search
points, which cross-validate on the training split and are never tested, are not runs), or with
one that is not valid YAML or, beside a run's files, names no model and dataset. Its status:
``finished`` (``test_metrics.json`` exists; the trainer writes it last), ``unfinished`` (still
running, stopped by Ctrl-C or a signal, or killed outright) or ``failed`` (its files cannot be
read or hold values that ``skinclf train`` never writes, or its ``job_status.json`` says it
stopped with an error). A sweep job refused before it ran has no run folder, only a record beside
it: it is listed as a failed run too. Each file is checked once, here, so that tables and figures
can trust it.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from skinclf.config import ABSENT, compose_config, composed_or_none, is_count, number_setting, override_key
from skinclf.errors import SkinclfError, counted, first_line
from skinclf.evaluation.metrics import scores_from_confusion
from skinclf.io import readable
from skinclf.run_files import (
    HYDRA_CONFIG,
    HYDRA_MULTIRUN,
    HYDRA_OVERRIDES,
    METRICS,
    PREDICTIONS,
    REFUSED_PREFIX,
    RUN_CONFIG,
    STATUS_FILE,
    TEST_METRICS,
)
from skinclf.run_folder import (
    RESULT_FILES,
    RUN_FOLDER_FILES,
    VOLATILE_KEYS,
    process_gone,
    read_status,
    recorded_overrides,
    recorded_root,
    trained_now,
)
from skinclf.sweep.jobs import refused_job_dir

FINISHED, UNFINISHED, FAILED = "finished", "unfinished", "failed"
# Files only a skinclf run or sweep job writes: beside a .hydra/config.yaml that is no skinclf
# config, they tell a run whose config was damaged from another Hydra application's output. Not
# train.log, metrics.csv or last.pt/best.pt: Hydra names an application's log after its script
# (any train.py writes one), and the others are common names in other training tools.
SKINCLF_ONLY_FILES = (RUN_CONFIG, STATUS_FILE, *RESULT_FILES)
FOLD_DIR = re.compile(r"fold_\d+")
# How an interrupted run (stopped, or killed outright) goes on.
RESUME_HINT = "resume=true, or re-launching its sweep, continues it"

METRICS_REQUIRED = ("epoch", "train_acc", "val_acc")
PREDICTIONS_REQUIRED = ("split", "label", "prob_mel")
# test_metrics.json of a run with a test split: scores that are fractions, and those of them that
# are NaN (JSON NaN) when undefined: sensitivity without a MEL image, AUC without both classes.
TEST_SCORES = ("accuracy", "f1", "sensitivity", "specificity", "roc_auc")
MAY_BE_NAN = ("sensitivity", "specificity", "roc_auc")
CONFUSION_CELLS = ("tn", "fp", "fn", "tp")

# Overrides that change where, how fast or how visibly a run happens, not what it measures: runs
# that differ only in these are repetitions of the same experiment. The keys a resume may change
# (VOLATILE_KEYS) are such keys by definition. The seed is the repetition axis itself; model and
# dataset are reported in their own columns.
NOT_AN_EXPERIMENT_SETTING = frozenset(
    {
        *VOLATILE_KEYS,
        "seed",
        "model",
        "data",
        "data.root",
        "data.cache_dir",
        "data.decode_cache",
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
    # Its .hydra/config.yaml as written (interpolations unresolved) and resolved (None where it
    # cannot be here: ${hydra:...}), None where there is none: what tells runs apart whose
    # overrides are alike (see groups.add_config_differences).
    config: dict | None = field(default=None, repr=False, compare=False)
    resolved: dict | None = field(default=None, repr=False, compare=False)
    status: str = UNFINISHED
    problem: str = ""
    history: pd.DataFrame | None = None
    test: dict | None = None
    # Why its predictions.csv cannot be read (see check_test_predictions): the run then counts
    # everywhere but in the ROC figure, whose curve is the only thing read from that file.
    predictions_problem: str = ""
    # The test rows once read: check_test_predictions reads them, the ROC figure uses them.
    _test_predictions: pd.DataFrame | None = field(default=None, repr=False, compare=False)

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

    def test_predictions(self) -> pd.DataFrame:
        """The test rows of predictions.csv (``label``, ``prob_mel``), which a tested run writes.

        A damaged or missing file raises ValueError with a message that begins with the file's
        name, as one of metrics.csv does (see :func:`check_test_predictions`). Read once."""
        if self._test_predictions is None:
            self._test_predictions = self._read_test_predictions()
        return self._test_predictions

    def _read_test_predictions(self) -> pd.DataFrame:
        path = self.path / PREDICTIONS
        if not path.is_file():  # removed, or a copy without it
            raise ValueError(f"{PREDICTIONS} missing; expected the file a tested run writes")
        expected_columns = "expected columns split,index,source,label,prob_mel"
        try:
            frame = _read_csv_keeping_line_numbers(path)
        # ValueError: pandas' parser and empty-file errors, and a file that is no UTF-8 text.
        except (ValueError, OSError) as err:
            raise ValueError(f"{PREDICTIONS} unreadable ({first_line(err)}); {expected_columns}") from err
        missing = [c for c in PREDICTIONS_REQUIRED if c not in frame.columns]
        if missing:
            raise ValueError(f"{PREDICTIONS} lacks columns {missing}; {expected_columns}")
        test = frame.loc[frame["split"] == "test", ["label", "prob_mel"]]
        # Checked as metrics.csv is: a text cell or a row cut short would otherwise reach the ROC
        # curve as a traceback, and a label outside 0/1 would draw a wrong one.
        for column, ok, expected in (
            ("label", lambda v: (v == 0) | (v == 1), "0 (NV) or 1 (MEL)"),
            ("prob_mel", lambda v: (v >= 0) & (v <= 1), "a probability in [0, 1]"),
        ):
            values = pd.to_numeric(test[column], errors="coerce").to_numpy(dtype=float)
            bad = ~ok(values)  # NaN (text, an empty cell) fails too
            if bad.any():
                raise ValueError(f"{PREDICTIONS} {_first_bad_cell(test, column, bad)}; expected {expected}")
            test[column] = values.astype(int) if column == "label" else values
        return test.reset_index(drop=True)


def check_test_predictions(runs: Sequence[Run]) -> None:
    """Read the predictions.csv of each tested run of ``runs``; those that cannot be read get
    their ``predictions_problem``, also named in their ``problem`` for runs.csv.

    A damaged or missing predictions.csv costs its run the ROC curve only: its Table 1 numbers and confusion
    matrix come from metrics.csv and test_metrics.json, and the other runs' report must not be
    lost over it."""
    for run in runs:
        if not run.tested:
            continue
        try:
            run.test_predictions()
        except ValueError as err:
            run.predictions_problem = str(err)
            run.problem = f"{err}; left out of roc.png"


# Per data source, the settings besides its root that give it other validation and test images:
# runs that differ in them are on different datasets (reported apart, never compared for the
# best row). Settings that change only the training split (data.train_size, balance_train) are
# variants of one dataset, and a folder's or DermaMNIST file's images are fixed by its root.
DATASET_SETTINGS = {"synthetic": ("seed", "val_size", "test_size")}


def dataset_key(cfg: DictConfig, root: str | None) -> str:
    """The dataset a run's config ``cfg`` trained and was tested on: its name, the root it read
    (absolute, when known), and those of its DATASET_SETTINGS that differ from their defaults
    (``synthetic [data.seed=1 data.val_size=64]``), so that default runs keep the plain name."""
    name = str(OmegaConf.select(cfg, "data.name", default="?"))
    if name == "dermamnist" and root:
        root = _dermamnist_file(root)
    key = f"{name}:{root}" if root else name
    settings = DATASET_SETTINGS.get(name, ())
    defaults = composed_or_none((f"data={name}",)) if settings else None
    differing = []
    for setting in settings:
        value = _dataset_setting(cfg, setting)
        if value is not None and value != _dataset_setting(defaults, setting):
            differing.append(f"data.{setting}={value}")
    return f"{key} [{' '.join(differing)}]" if differing else key


def _dermamnist_file(root: str) -> str:
    """The npz file a DermaMNIST run's absolute ``data.root`` names (a folder or the file itself),
    symlinks resolved as for every root, so that runs given the folder and runs given its file are
    one dataset; the root as recorded where it names no file here now (moved, deleted), or where
    it is relative (a run without a record of the folder it started in)."""
    # Imported here: skinclf.data imports torch, which a report of other datasets never needs.
    from skinclf.data.dermamnist import npz_file

    if not os.path.isabs(root):
        return root
    try:
        return os.path.realpath(npz_file(Path(root)))
    except (SkinclfError, OSError):
        return root


def _dataset_setting(cfg: DictConfig | None, setting: str) -> int | str | None:
    """``data.<setting>`` as the data source reads it: a whole number (64.0 is 64); None where the
    key is absent (a run from an older skinclf, which used the default); the text of a value
    that cannot be resolved here (``${hydra:job.num}``, known only inside Hydra)."""
    data = None if cfg is None else cfg.get("data")
    if not isinstance(data, DictConfig) or setting not in data:
        return None
    try:
        return number_setting(data, setting, int)
    except (SkinclfError, OmegaConfBaseException):
        return str(OmegaConf.to_container(data, resolve=False).get(setting))


def describe_dataset(data: str) -> str:
    """The dataset's name as shown in table headers and figure titles; the synthetic data says so."""
    if data == "synthetic" or data.startswith("synthetic ["):
        return f"{data.replace('synthetic', 'synthetic data', 1)} (procedurally generated, not real lesions)"
    # "data" after the name, before the evaluation content's digest (a root may hold " [" itself).
    content = re.search(r" \[eval data (?:[0-9a-f]{8}|unknown)\]$", data)
    name, suffix = (data[: content.start()], content.group()) if content else (data, "")
    return f"{readable(name)} data{suffix}"  # a folder dataset's root may be no UTF-8


def find_runs(dirs: Sequence[Path]) -> list[Run]:
    """All skinclf run folders under ``dirs`` (each a run or multirun folder), sorted by path."""
    seen: dict[Path, Path] = {}
    for root in map(Path, dirs):
        if not root.is_dir():
            continue
        for config in root.rglob(str(HYDRA_CONFIG)):
            seen.setdefault(config.parent.parent.resolve(), config.parent.parent)
    records = {
        record.resolve(): record
        for root in map(Path, dirs)
        if root.is_dir()
        for record in root.rglob(f"{REFUSED_PREFIX}*.json")
    }
    runs = [load_run(seen[key]) for key in sorted(seen)]
    run_dirs = set(seen)
    runs += [_refused_job(records[key], run_dirs) for key in sorted(records)]
    found = sorted((run for run in runs if run is not None), key=lambda run: str(run.path))
    _tell_evaluation_data_apart(found)
    return found


def _tell_evaluation_data_apart(runs: list[Run]) -> None:
    """Runs of one dataset (one root) validated and tested on other images (images added to the
    folder, moved between splits, relabelled between runs) are scores of different data: each
    such content becomes a dataset of its own, named by its digest (``folder:/data/isic [eval
    data 1a2b3c4d]``); its runs that record none (older skinclf, unfinished) are ``[eval data
    unknown]``. A dataset of one content keeps its plain name, its older runs with it."""
    for run, digest in told_apart_by_digest(runs, "eval_data_sha256", lambda run: run.data):
        run.data = f"{run.data} [eval data {digest}]"


def told_apart_by_digest(
    runs: Iterable[Run], key: str, alike: Callable[[Run], Hashable]
) -> list[tuple[Run, str]]:
    """Each run of ``runs`` whose ``alike`` peers record more than one data digest under ``key``,
    with its :func:`short_digest` (``unknown`` where it records none); the others not at all."""
    peers: dict[Hashable, list[tuple[Run, str | None]]] = {}
    for run in runs:
        peers.setdefault(alike(run), []).append((run, recorded_digest(run, key)))
    return [
        (run, short_digest(digest))
        for members in peers.values()
        if len({digest for _, digest in members if digest}) > 1
        for run, digest in members
    ]


def recorded_digest(run: Run, key: str) -> str | None:
    """A data digest that ``run``'s test_metrics.json records under ``key``; None where it has none
    (an older skinclf's run, an unfinished one)."""
    digest = (run.test or {}).get(key)
    return digest if isinstance(digest, str) and digest else None


def short_digest(digest: str | None) -> str:
    """How a digest names data in labels: its first 8 hex digits, or ``unknown``."""
    return digest[:8] if digest else "unknown"


def _refused_job(record: Path, runs_found: set[Path]) -> Run | None:
    """A sweep job refused before it ran (a bad setting, missing data), from the record beside its
    folder (sweep/jobs.py, ``record_refusal``): a failed run with the refusal's error. None when
    the record is unreadable, or when the job's folder is a run now (a later launch ran it, or it
    held an earlier run, refused as another config): that run is listed instead."""
    job_dir = refused_job_dir(record.parent, record)
    if job_dir.resolve() in runs_found:
        return None
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("overrides"), list):
        return None
    overrides = [str(override) for override in info["overrides"]]
    problem = f"refused before it ran: {info.get('error', 'no error recorded')}"
    # The job's config as it would have run: its model, dataset, seed and settings named as a
    # run's are.
    cfg = composed_or_none(tuple(overrides))
    if cfg is None:  # e.g. a model this skinclf no longer has
        return Run(job_dir, "?", "?", None, status=FAILED, problem=problem)
    seed = cfg.get("seed")
    # Absolute, as a run's: a relative root counts from where the sweep was launched.
    root = cfg.data.get("root")
    root = root and (recorded_root(record.parent, str(root), HYDRA_MULTIRUN) or root)
    return Run(
        job_dir,
        str(cfg.model.get("name", "?")),
        dataset_key(cfg, root),
        seed if isinstance(seed, int) else None,
        _settings(overrides, cfg),
        status=FAILED,
        problem=problem,
    )


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a skinclf run's: one the report reads as a run, or one with a file only
    skinclf writes (a grid-search point, which the report does not list)."""
    return any((folder / name).exists() for name in SKINCLF_ONLY_FILES) or reads_as_run(folder)


def reads_as_run(folder: Path) -> bool:
    """Whether the report reads ``folder`` as a skinclf run: a Hydra record that :func:`load_run`
    takes for one (not another Hydra application's output)."""
    return (folder / HYDRA_CONFIG).is_file() and load_run(folder) is not None


def run_file_at(path: Path) -> Path | None:
    """The file (or folder) of a skinclf run that writing ``path`` would replace or write into:
    one of its RUN_FOLDER_FILES or fold_K/ folders, there or still to come; None when ``path`` is
    none of them: what `skinclf predict` and `skinclf explain` must never write over.

    A new file of another name in a run folder is no run's file: the folder is the user's too."""
    target = Path(path).resolve()
    for folder in target.parents:
        first = target.relative_to(folder).parts[0]
        if (first in RUN_FOLDER_FILES or FOLD_DIR.fullmatch(first)) and is_run_folder(folder):
            return folder / first
    return None


def load_run(path: Path) -> Run | None:
    """Read one run folder; None when its config is not a skinclf training config and no run's
    files lie beside it (another Hydra application's output)."""
    try:
        cfg = OmegaConf.load(path / HYDRA_CONFIG)
    except Exception as err:  # any YAML problem: the folder is listed as failed, not skipped
        return Run(path, "?", "?", None, status=FAILED, problem=f"{HYDRA_CONFIG} unreadable: {err}")
    try:
        mapping = isinstance(cfg, DictConfig)
        model = OmegaConf.select(cfg, "model.name", default=None) if mapping else None
        data_name = OmegaConf.select(cfg, "data.name", default=None) if mapping else None
        if model is None or data_name is None:
            if any((path / name).exists() for name in SKINCLF_ONLY_FILES):
                # A run's config, emptied or overwritten (OmegaConf reads an empty file, and CSV
                # text, as a mapping): as failed as one with a YAML error, not silently left out.
                problem = (
                    f"{HYDRA_CONFIG}: no model.name or data.name; expected the config of `skinclf train`"
                )
                return Run(path, "?", "?", None, status=FAILED, problem=problem)
            return None  # another Hydra application's output
        if OmegaConf.select(cfg, "cv.folds", default=None):
            return None  # a grid-search point: cross-validated, never tested; see its grid_search.md
        root = OmegaConf.select(cfg, "data.root", default=None)
        # Two folder datasets are different datasets: the root is part of the identity.
        # Keyed by the absolute root the run read, so `ds` typed in two folders is two datasets, and
        # `ds`, `./ds`, `$PWD/ds` in one are one; as typed when the run has no record of its folder.
        data = dataset_key(cfg, recorded_root(path, str(root)) or root if root else None)
        seed = OmegaConf.select(cfg, "seed", default=None)
        # A whole number, as `skinclf train` takes it (3.0 is 3): text such as `abc` is damage.
        seed = None if seed is None else number_setting(cfg, "seed", int)
        overrides = recorded_overrides(path)
        if overrides is None:
            # Its row would be the default settings' (an lr=1e-3 run beside the 1e-4 ones).
            problem = (
                f"{HYDRA_OVERRIDES}: missing or not a list of overrides, so the run's settings cannot "
                "be told; expected the record `skinclf train` wrote"
            )
            return Run(path, str(model), data, seed, status=FAILED, problem=problem)
        run = Run(path, str(model), data, seed, _settings(overrides, cfg))
        run.config = OmegaConf.to_container(cfg, resolve=False)
        try:
            run.resolved = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException:
            run.resolved = None
    except (OmegaConfBaseException, SkinclfError) as err:
        # As failed as a YAML error: a `${...}` that names no key, a seed that is no number.
        key = getattr(err, "full_key", "")
        problem = f"{HYDRA_CONFIG}: {key + ': ' if key else ''}{first_line(err)}"
        return Run(path, "?", "?", None, status=FAILED, problem=problem)

    try:
        run.history = _read_history(path / METRICS)
        test_path = path / TEST_METRICS
        if test_path.is_file():
            run.test = _read_test_metrics(test_path)
            if run.history is None or run.history.empty:
                lacks = "is missing" if run.history is None else "has no epochs"
                raise ValueError(f"{TEST_METRICS} exists but {METRICS} {lacks}")
            run.status = FINISHED
        else:
            n = 0 if run.history is None else len(run.history)
            epochs = counted(n, "epoch")
            status = read_status(path)
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
            elif trained_now(status):
                run.problem = f"still running: process {status['pid']} on this machine ({epochs} done)"
            elif status.get("status") == "running" and status.get("host") not in (None, socket.gethostname()):
                # A cluster node's run: its process cannot be checked from here.
                run.problem = f"no {TEST_METRICS} ({epochs} done): may still be running on {status['host']}"
            else:  # no record of how it ended (an older skinclf, or a platform where it cannot tell)
                run.problem = f"no {TEST_METRICS} ({epochs} done)"
    except (ValueError, OSError) as err:
        run.status, run.problem = FAILED, str(err)
    return run


def _read_history(path: Path) -> pd.DataFrame | None:
    """metrics.csv, checked: every report number comes from it, and a NaN or a text cell (a torn
    or hand-edited file) would otherwise pass silently into Table 1 or pick the best epoch."""
    if not path.is_file():
        return None
    try:
        history = _read_csv_keeping_line_numbers(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(METRICS_REQUIRED))
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{METRICS} unreadable ({first_line(err)})") from err
    missing = [c for c in METRICS_REQUIRED if c not in history.columns]
    if missing:
        raise ValueError(f"{METRICS} lacks columns {missing}")
    for column in METRICS_REQUIRED:
        values = pd.to_numeric(history[column], errors="coerce")  # text -> NaN
        numbers = values.to_numpy(dtype=float)
        # NaN (text, an empty cell, a row cut short) fails both tests, as infinity does.
        if column == "epoch":
            bad, expected = numbers % 1 != 0, "a whole number"
        else:
            bad, expected = ~((numbers >= 0) & (numbers <= 1)), "an accuracy in [0, 1]"
        if bad.any():
            raise ValueError(f"{METRICS} {_first_bad_cell(history, column, bad)}; expected {expected}")
        history[column] = values.astype(int) if column == "epoch" else values
    history = history.sort_values("epoch").reset_index(drop=True)
    epochs = history["epoch"].tolist()
    if epochs != list(range(1, len(epochs) + 1)):
        shown = ", ".join(map(str, epochs[:8])) + (", ..." if len(epochs) > 8 else "")
        raise ValueError(
            f"{METRICS}: epochs {shown}; expected one row per epoch, 1, 2, 3, ... (a torn or edited file?)"
        )
    return history


def _read_csv_keeping_line_numbers(path: Path) -> pd.DataFrame:
    """A CSV file without its blank lines, each row keeping its place in the file as its index
    (row i is line i + 2): pandas would otherwise drop blank lines and renumber what follows."""
    frame = pd.read_csv(path, skip_blank_lines=False)
    return frame.dropna(how="all")


def _first_bad_cell(frame: pd.DataFrame, column: str, bad: np.ndarray) -> str:
    """``line N: COLUMN is VALUE`` for the first row of ``frame`` (read by
    :func:`_read_csv_keeping_line_numbers`) that ``bad`` marks."""
    row = int(np.flatnonzero(bad)[0])
    cell = frame[column].iloc[row]
    shown = "empty or NaN" if pd.isna(cell) else repr(str(cell))
    return f"line {int(frame.index[row]) + 2}: {column} is {shown}"  # line 1: the header


def _read_test_metrics(path: Path) -> dict:
    """test_metrics.json, checked: the report reads its numbers without further ado."""
    try:
        test = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{TEST_METRICS} is not valid JSON ({err})") from err
    if not isinstance(test, dict):
        raise ValueError(f"{TEST_METRICS}: expected a JSON object")
    environment = test.get("environment", {})  # absent from runs made before it was recorded
    if not (
        isinstance(environment, dict)
        and all(isinstance(v, bool if k == "channels_last" else str) for k, v in environment.items())
    ):
        raise ValueError(
            f"{TEST_METRICS}: environment is {environment!r}; expected an object of strings "
            "(channels_last: true or false)"
        )
    if "best_epoch" in test:  # the tested checkpoint, which Table 1 reports (runs.csv too)
        epoch, val_acc = test["best_epoch"], test.get("best_val_acc")
        if not (is_count(epoch) and epoch >= 1 and _is_fraction(val_acc)):
            raise ValueError(
                f"{TEST_METRICS}: best_epoch={epoch!r}, best_val_acc={val_acc!r}; expected an epoch "
                "number and a fraction in [0, 1]"
            )
    n_test = test.get("n_test", 0)  # absent: a run without a test split, from before n_test existed
    if not is_count(n_test):
        raise ValueError(f"{TEST_METRICS}: n_test is {n_test!r}; expected a whole number of test images")
    if not n_test:
        return test
    missing = [key for key in (*TEST_SCORES, "confusion") if key not in test]
    if missing:
        raise ValueError(f"{TEST_METRICS} lacks {', '.join(missing)}")
    for key in TEST_SCORES:
        value = test[key]
        if not (_is_fraction(value) or (key in MAY_BE_NAN and _is_number(value) and np.isnan(value))):
            expected = "a fraction in [0, 1]" + (" or NaN" if key in MAY_BE_NAN else "")
            raise ValueError(f"{TEST_METRICS}: {key} is {value!r}; expected {expected}")
    confusion = test["confusion"]
    if not (
        isinstance(confusion, dict)
        and all(is_count(confusion.get(cell)) for cell in CONFUSION_CELLS)
        and sum(confusion[cell] for cell in CONFUSION_CELLS) == n_test
    ):
        raise ValueError(
            f"{TEST_METRICS}: confusion is {confusion!r}; expected counts {', '.join(CONFUSION_CELLS)} "
            f"summing to n_test={n_test}"
        )
    for key, expected in scores_from_confusion(confusion).items():
        value = test[key]
        if not (np.isnan(expected) and np.isnan(value) or math.isclose(value, expected, abs_tol=1e-9)):
            raise ValueError(
                f"{TEST_METRICS}: {key} is {value!r}, but its confusion counts {confusion!r} give "
                f"{expected:.6g}; expected the file skinclf train wrote (one number edited, or a torn copy?)"
            )
    return test


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_fraction(value: object) -> bool:
    return _is_number(value) and 0 <= value <= 1


@cache
def _default_group_choices() -> dict[str, str | None]:
    """The config groups (model, data, recipe, experiment, ...) and their default choices (None:
    off), as `skinclf train` composes them."""
    choices = compose_config([], return_hydra_config=True).hydra.runtime.choices
    return {
        str(group): None if choice is None else str(choice)
        for group, choice in choices.items()
        if not str(group).startswith("hydra/")
    }


def _settings(overrides: Sequence[str], cfg: DictConfig) -> dict[str, str]:
    """The run's command-line ``overrides`` that define the experiment (see
    NOT_AN_EXPERIMENT_SETTING), each with the value it resolved to in the run's config ``cfg``.

    The resolved value, not the override's text: `optim.lr=1e-3` and `optim.lr=0.001` are one
    setting. An override that leaves its value at the default of the run's config groups
    (`optim.lr=1e-4`, `recipe=paper`, `experiment=paper`, whose values are the defaults) is the
    default run spelled out, not another setting.
    """
    parsed = [(override_key(override), override.partition("=")[2]) for override in overrides]
    groups = _default_group_choices()
    choices = tuple(f"{key}={value}" for key, value in parsed if key in groups)
    defaults = composed_or_none(choices)
    settings = {}
    for key, value in parsed:
        if key in NOT_AN_EXPERIMENT_SETTING or key.startswith("hydra."):
            continue
        if key in groups:
            # Compared by what the choice does to this run's config, not by its name against the
            # global default: with model=res_aug, pipeline@model.pipeline=default is a setting.
            if _changes_nothing(f"{key}={value}", choices):
                continue
            settings[key] = value
            continue
        resolved = OmegaConf.select(cfg, key, default=ABSENT, throw_on_resolution_failure=False)
        if resolved is ABSENT:  # not in the saved config (`+new.key=...` of another version)
            # Hydra's multirun writes a swept `false` back as `False`.
            settings[key] = value.lower() if value in ("True", "False") else value
            continue
        default = (
            ABSENT
            if defaults is None
            else OmegaConf.select(defaults, key, default=ABSENT, throw_on_resolution_failure=False)
        )
        if resolved != default:
            settings[key] = as_override(resolved)
    return settings


@cache
def keys_set_by(choice: str) -> frozenset[str]:
    """The config keys (dotted leaves) whose values a group ``choice`` (``recipe=modern``) changes
    from the defaults: ``optim.lr`` among them, outside the recipe's own package."""
    with_it, without_it = composed_or_none((choice,)), composed_or_none(())
    if with_it is None or without_it is None:
        return frozenset()
    leaves = [dict(leaves_of(OmegaConf.to_container(c, resolve=False))) for c in (with_it, without_it)]
    return frozenset(k for k in leaves[0].keys() | leaves[1].keys() if leaves[0].get(k) != leaves[1].get(k))


def leaves_of(node: object, prefix: str = "") -> Iterable[tuple[str, object]]:
    """(dotted key, value) of every leaf of a nested dict."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves_of(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def is_group(key: str) -> bool:
    """Whether a setting's key is a config group (``recipe``), not a value (``optim.lr``)."""
    return key in _default_group_choices()


def _changes_nothing(choice: str, choices: tuple[str, ...]) -> bool:
    """Whether group ``choice``, among the run's ``choices``, leaves every config value as it was."""
    with_it, without_it = (
        composed_or_none(choices),
        composed_or_none(tuple(c for c in choices if c != choice)),
    )
    if with_it is None or without_it is None:
        return False
    return OmegaConf.to_container(with_it) == OmegaConf.to_container(without_it)


def as_override(value: object) -> str:
    """A config value as an override writes it (`0.001`, `false`, `null`, `[0.5, 1.0]`): one
    spelling per value, so that equal values make equal row labels."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # `=1` and `=1.0` are one value
    return value if isinstance(value, str) else json.dumps(value)
