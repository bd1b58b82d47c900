"""A run folder's own records, for single runs and sweep jobs alike, and the claim that keeps
two processes, or two configs, out of one folder.

Besides the run's outputs, a run folder gets two small files:
- ``run_config.json``: the resolved config its results belong to; a resume or a sweep's re-launch
  compares against it, so a folder is never resumed or skipped under a different config
  (:func:`claim_run_dir`).
- ``job_status.json``: running (+ the process and its machine) / done / skipped / failed (+ error
  and log path) / stopped, tagged with the sweep launch that wrote it (None for a single run),
  for the end-of-sweep summary (skinclf.sweep.summary) and ``skinclf report``
  (:func:`recorded_status`).
It also reads what Hydra recorded of the run in .hydra/ (:func:`hydra_record`,
:func:`recorded_overrides`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from skinclf.config import data_path, override_key
from skinclf.errors import SkinclfError, first_line, out_of_space
from skinclf.io import atomic_write_json, remove_temporaries, temporaries_of
from skinclf.run_files import (
    BEST_CHECKPOINT,
    CV_RESULT,
    FOLD_RESULT,
    FOLDS_RECORD,
    HYDRA_CONFIG,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_SETTINGS,
    LAST_CHECKPOINT,
    METRICS,
    PR_FIGURE,
    PREDICTIONS,
    ROC_FIGURE,
    RUN_CONFIG,
    STATUS_FILE,
    TEST_METRICS,
    TRAIN_LOG,
)

log = logging.getLogger("skinclf")


# What a run folder holds before its run produced anything.
BOOKKEEPING = frozenset({HYDRA_DIR, TRAIN_LOG, RUN_CONFIG, STATUS_FILE})


# What a finished job has written last: run() the test metrics, cross_validate() its CV result.
RESULT_FILES = (TEST_METRICS, CV_RESULT)


# What a run writes once it has trained: a folder holding any of these holds a run.
RUN_OUTPUTS = (METRICS, LAST_CHECKPOINT, BEST_CHECKPOINT, *RESULT_FILES)
# Every file `skinclf train` (a sweep job, a grid-search point) writes in its run folder, and the
# folders that hold only its files (.hydra/; a grid point's fold_K/ also match FOLD_DIR).
RUN_FOLDER_FILES = frozenset({*BOOKKEEPING, *RUN_OUTPUTS, PREDICTIONS, ROC_FIGURE, PR_FIGURE, FOLDS_RECORD})
# What a run (or a grid point's fold) writes through atomic_write: a temporary of one of these
# names is its own, and only those are removed as a killed process's leftovers.
WRITTEN_BY_A_RUN = (
    *RUN_FOLDER_FILES - {HYDRA_DIR, TRAIN_LOG},
    FOLD_RESULT,
    # The run's Hydra record, in .hydra/, which skinclf writes itself (train_command).
    HYDRA_CONFIG.name,
    HYDRA_OVERRIDES.name,
    HYDRA_SETTINGS.name,
)


# Keys that do not change what a run computes, so a resume may change them.
VOLATILE_KEYS = (
    "resume",
    "device",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.keep_freed_memory",
    "trainer.checkpoint_every",
)


class FolderBusy(SkinclfError):
    """A run folder that another process is training in: the refusal must leave it exactly as it
    is, its records included (that process may not have written them yet)."""


def comparable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys a resume may change (VOLATILE_KEYS), and with
    ``data.root`` as the absolute path it names (symlinks resolved): a relative root typed in
    another folder is another dataset, and must not continue a run begun on the first."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    if isinstance(config.get("data"), dict) and config["data"].get("root") not in (None, ""):
        config["data"]["root"] = os.path.realpath(data_path(cfg.data))
    for dotted in VOLATILE_KEYS:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return config


def claim_run_dir(
    out_dir: Path, cfg: DictConfig, overrides: Sequence[str] = (), single_run: bool = False
) -> str:
    """Check that ``out_dir`` holds nothing from another config and record this one.

    Returns "new" (nothing of this config there yet), "unfinished" (a run of this config that
    did not finish: resume it) or "finished" (nothing to do). Raises SkinclfError when it holds
    results of a different config: resuming or overwriting them would silently mix two experiments;
    so are results without a record of their config. A ``single_run`` (not a sweep job, which
    resumes on its own) is refused, before anything is written, when it would train anew over an
    unfinished run (no resume=true) or finds no run to resume (resume=true).

    A folder from an older skinclf lacks the config keys added since. Such a key counts as the
    same config when none of the run's command-line ``overrides`` sets it: the run then had no
    say in it, and it takes the value the config files give it. Its run_config.json is updated.
    """
    config = comparable_config(cfg)
    stored_path = out_dir / RUN_CONFIG
    if stored_path.exists():
        try:
            stored = json.loads(stored_path.read_text())
        except (OSError, ValueError) as err:
            raise SkinclfError(
                f"{stored_path}: unreadable ({err}), so this folder's config is unknown; "
                "use a new hydra.run.dir / hydra.sweep.dir"
            ) from err
        _resolve_stored_root(stored, out_dir)
        added: list[str] = []
        if stored != config:
            differing = sorted(_differences(stored, config))
            # Keys this skinclf added since, which the run's overrides leave to the config files.
            added = [
                key for key in differing if not _has_key(stored, key) and not _overridden(key, overrides)
            ]
            changed = [key for key in differing if key not in added]
            if changed:
                raise SkinclfError(
                    f"{out_dir}: holds a run of a different config (changed: {', '.join(changed[:5])}); "
                    "use a new hydra.run.dir / hydra.sweep.dir, or the original overrides"
                )
        state = "finished" if any((out_dir / name).exists() for name in RESULT_FILES) else "unfinished"
        status = read_status(out_dir)
        if state == "unfinished" and trained_now(status):
            # Two processes training into one folder would interleave their epochs and
            # checkpoints: a second `resume=true`, or a sweep launched again while it runs.
            raise FolderBusy(
                f"{out_dir}: is being trained now by process {status['pid']} on this machine "
                f"({STATUS_FILE}); wait for it to end, or use a new hydra.run.dir / hydra.sweep.dir "
                f"(if that process is not skinclf, its id reused after a crash, delete {STATUS_FILE})"
            )
        if single_run and state == "unfinished" and not cfg.resume:
            # Training it anew would overwrite its checkpoint and metrics without a word.
            raise SkinclfError(
                f"{out_dir}: holds an unfinished run of this config; add resume=true to continue it, "
                "or use a new hydra.run.dir to train it again"
            )
        if added:
            log.warning(
                f"{out_dir}: its {RUN_CONFIG} predates the config keys {', '.join(added)} (an older "
                "skinclf); no override sets them, so it counts as this config, with their configured values"
            )
            atomic_write_json(config, stored_path)
        return state
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if found:
        # Resuming or overwriting them could mix two experiments, and nothing tells which.
        raise SkinclfError(
            f"{out_dir}: holds a run's {found[0]} but no {RUN_CONFIG} (which skinclf writes before a "
            "run starts; an early version did not), so that run's config is unknown; use a new "
            "hydra.run.dir / hydra.sweep.dir"
        )
    if single_run and cfg.resume:
        # A misspelt or forgotten hydra.run.dir would otherwise train anew, exit 0, unnoticed.
        raise SkinclfError(
            f"resume=true: {out_dir} holds no run to resume; expected the folder of an earlier run "
            "(hydra.run.dir=FOLDER, as its `output directory:` line names it), or no resume=true "
            "to train anew"
        )
    atomic_write_json(config, stored_path)
    return "new"


def differences_from_record(run_dir: Path, config: dict[str, Any]) -> list[str]:
    """The keys (dotted) whose values in ``config`` (a checkpoint's resolved config) differ from
    the record of the run in ``run_dir`` (its run_config.json): those of the keys both hold,
    other than the ones a resume may change and ``data.root`` (recorded absolute, possibly typed
    relative in the checkpoint). Empty when the folder has no record (an early run); a record
    that cannot be read (a torn copy, a hand edit) is a SkinclfError: nothing to tell by."""
    record = Path(run_dir) / RUN_CONFIG
    if not record.exists():
        return []
    try:
        stored = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        stored = err
    if not isinstance(stored, dict):
        why = first_line(stored) if isinstance(stored, Exception) else "not a JSON object"
        raise SkinclfError(
            f"{record}: unreadable ({why}), so the run's checkpoint cannot be checked against it; "
            "expected the record skinclf train wrote"
        )
    return config_differences(stored, config)


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys (dotted) that both resolved configs hold with different values, other than the
    ones a resume may change and ``data.root`` (absolute in one, possibly typed relative in the
    other): whether two records are of the same run."""
    ignored = (*VOLATILE_KEYS, "data.root")
    return [key for key in _differences(a, b) if key not in ignored and _has_key(a, key) and _has_key(b, key)]


def _resolve_stored_root(stored: dict[str, Any], out_dir: Path) -> None:
    """A run_config.json from before roots were stored absolute holds ``data.root`` as typed:
    resolve it as the run did (see :func:`recorded_root`); without a record it stays as typed."""
    data = stored.get("data")
    root = data.get("root") if isinstance(data, dict) else None
    if isinstance(root, str) and root:
        data["root"] = recorded_root(out_dir, root) or root


def recorded_root(run_dir: Path, root: str, settings: str | Path = HYDRA_SETTINGS) -> str | None:
    """The absolute ``data.root`` (symlinks resolved) that the run in ``run_dir`` read: a relative
    root counts from the folder its launch started in, which Hydra records in
    .hydra/hydra.yaml (``hydra.runtime.cwd``: the physical path), and for a whole sweep in its
    multirun.yaml (``settings``, relative to ``run_dir``). None when a relative root has no such
    record (a copied-out run)."""
    path = os.path.expanduser(root)
    if not os.path.isabs(path):
        cwd = recorded(hydra_record(Path(run_dir) / settings), "hydra.runtime.cwd")
        if not cwd:
            return None
        path = os.path.join(str(cwd), path)
    return os.path.realpath(path)


def hydra_record(path: Path) -> DictConfig | None:
    """A run's or sweep's record of its Hydra settings (.hydra/hydra.yaml, multirun.yaml); None
    where it is missing or unreadable (torn, hand-edited, a copied-out run without one)."""
    try:
        record = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - OmegaConf.load raises whatever its YAML reader meets
        return None
    return record if isinstance(record, DictConfig) else None


def recorded_overrides(run_dir: Path) -> list[str] | None:
    """A run's command-line overrides, as Hydra recorded them in .hydra/overrides.yaml; None where
    that file is missing or is not a list of strings (torn, hand-edited)."""
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / HYDRA_OVERRIDES))
    except Exception:  # noqa: BLE001 - OmegaConf.load raises whatever its YAML reader meets
        return None
    return string_list(overrides)


def string_list(value: object) -> list[str] | None:
    """``value`` as a list of overrides; None unless it is a list of strings."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def recorded(record: DictConfig | None, key: str) -> Any:
    """``key``'s value in a Hydra ``record`` (:func:`hydra_record`) as plain Python; None where the
    record or the key is missing, or the value cannot be resolved here."""
    if record is None:
        return None
    value = OmegaConf.select(record, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            diff
            for key in sorted(set(a) | set(b), key=str)
            for diff in _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        ]
    return [] if a == b else [prefix.rstrip(".")]


def _has_key(config: dict[str, Any], dotted: str) -> bool:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _overridden(dotted: str, overrides: Sequence[str]) -> bool:
    """Whether a command-line override (``key=value``, ``+key=value``, ``~key``) sets ``dotted``
    or something inside it."""
    names = (override_key(override) for override in overrides)
    return any(name == dotted or name.startswith(f"{dotted}.") for name in names)


def read_status(out_dir: Path) -> dict[str, Any]:
    """The run's or sweep job's job_status.json; empty when it has none or it is unreadable (runs
    from before status files, a torn copy)."""
    return read_record(Path(out_dir) / STATUS_FILE)


def read_record(path: Path) -> dict[str, Any]:
    """A job_status.json or refusal record (a JSON object); empty when missing or unreadable (a
    torn copy, a hand edit), so that one bad record never stops a sweep's summary or a report."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_status(out_dir: Path, status: str, launch: str | None, **info: Any) -> None:
    """Record a job's state (running, done, skipped, failed, stopped) for the sweep summary and
    ``skinclf report``."""
    atomic_write_json({"status": status, "launch": launch, **info}, out_dir / STATUS_FILE)


@contextlib.contextmanager
def run_dir_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` for this process while it claims and trains in it; raise SkinclfError if
    another process holds it.

    The job_status.json check (:func:`trained_now`) has a gap: two processes started in the same
    instant (two resume=true, a sweep launched twice) both read the status before either writes
    "running". An OS lock (``flock`` on the folder) closes it, and the kernel releases it however
    the process ends. Where there is none to take (Windows, some network file systems), the status
    check works alone, as before."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise FolderBusy(
                f"{out_dir}: is being trained now by another process on this machine (it holds the "
                "folder's lock); wait for it to end, or use a new hydra.run.dir / hydra.sweep.dir"
            ) from err
        except OSError:  # a file system without flock (NFS may refuse it on a folder): status only
            pass
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def recorded_status(out_dir: Path, launch: str | None, **info: Any) -> Iterator[None]:
    """Record the work inside as running, then done, failed (with the error's first line) or
    stopped (Ctrl-C, or SIGTERM as the CLI raises it: resumable). Errors are re-raised.

    "running" names the process and its machine: a process killed outright (SIGKILL, the
    out-of-memory killer) records nothing more, and ``skinclf report`` can then tell it from a
    run that is still going (:func:`process_gone`). Such a process may also have left a
    half-written file (:func:`remove_leftover_temporaries`)."""
    remove_leftover_temporaries(out_dir)
    write_status(out_dir, "running", launch, pid=os.getpid(), host=socket.gethostname(), **info)
    try:
        yield
    except Exception as err:
        # A full disk may have caused the error: the status cannot be written then, and the
        # error itself is what the user must see (the status stays "running", a dead process).
        with contextlib.suppress(OSError):
            write_status(out_dir, "failed", launch, error=first_line(err), **info)
        raise
    except BaseException as stop:
        # For the run's train.log, read long after the console is gone; the console has the
        # command's own line on how to go on.
        log_to_file_only(f"stopped by {_stopped_by(stop)} (resumable)", logging.WARNING)
        with contextlib.suppress(OSError):
            write_status(out_dir, "stopped", launch, **info)
        raise
    write_status(out_dir, "done", launch, **info)


class TrainLogHandler(logging.FileHandler):
    """The handler of a run's train.log (conf/hydra/job_logging/skinclf.yaml). On a full disk
    logging's own handler printed a 45-line '--- Logging error ---' traceback for every log line,
    burying the run's one-line error; those lines are dropped instead (the console has them)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if out_of_space(sys.exc_info()[1]) is None:
            super().handleError(record)


def log_to_file_only(message: str, level: int = logging.ERROR, exc_info: BaseException | None = None) -> None:
    """``message`` (and ``exc_info``'s traceback) into the run's train.log (Hydra's file handler),
    not again on the console."""
    details = None if exc_info is None else (type(exc_info), exc_info, exc_info.__traceback__)
    record = logging.LogRecord("skinclf", level, __file__, 0, message, None, details)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _stopped_by(stop: BaseException) -> str:
    """Ctrl-C, or the signal a ``SystemExit(128 + N)`` stands for (`kill`: SIGTERM)."""
    if isinstance(stop, KeyboardInterrupt):
        return "Ctrl-C"
    code = getattr(stop, "code", None)
    if isinstance(code, int) and code > 128:
        with contextlib.suppress(ValueError):
            return signal.Signals(code - 128).name
    return type(stop).__name__


def remove_leftover_temporaries(out_dir: Path) -> None:
    """Remove the temporary files that an earlier process of this run (or of a grid point's
    folds) was killed while writing: a checkpoint's can take gigabytes, and nothing else would
    ever remove them. Called by the process that holds the folder, before it writes anything
    (it trains over the files they were to become)."""
    folds = sorted(folder for folder in out_dir.glob("fold_*") if folder.is_dir())
    folders = [out_dir, out_dir / HYDRA_DIR, *folds]
    runs_own = temporaries_of(WRITTEN_BY_A_RUN)
    leftovers = [tmp for folder in folders for tmp in remove_temporaries(folder, runs_own)]
    if leftovers:
        names = ", ".join(str(tmp.relative_to(out_dir)) for tmp in leftovers)
        log.info(f"{out_dir}: removed what an interrupted process left half-written: {names}")


def trained_now(status: dict[str, Any]) -> bool:
    """Whether a status says running and names a live process on this machine (another one)."""
    return status.get("status") == "running" and _process_state(status) == "alive"


def process_gone(status: dict[str, Any]) -> bool:
    """Whether the process that a "running" status names has ended without recording how.
    False wherever that cannot be told (see :func:`_process_state`)."""
    return _process_state(status) == "gone"


def _process_state(status: dict[str, Any]) -> str | None:
    """Whether the process a status names is "alive" or "gone"; None where that cannot be told.

    Only answerable on the machine it ran on, and only on POSIX (Windows' ``os.kill`` would
    terminate the process). A recycled process id reads as alive; the calling process itself
    (a sweep's jobs in one process) is never another run's.
    """
    pid = status.get("pid")
    if os.name != "posix" or not isinstance(pid, int) or status.get("host") != socket.gethostname():
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return "gone"
    except PermissionError:  # it exists, under another user
        pass
    return "alive"


def holds_only_bookkeeping(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds nothing a run produced: only its config, status, log and .hydra/."""
    return out_dir.is_dir() and all(p.name in BOOKKEEPING for p in out_dir.iterdir())


def holds_a_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run: its config record or anything it wrote once it trained."""
    return any((out_dir / name).exists() for name in (RUN_CONFIG, *RUN_OUTPUTS))


def release_claim(out_dir: Path) -> None:
    """Undo :func:`claim_run_dir` (and the .hydra/ and status records written with it) in a folder
    whose run failed before it produced anything: a corrected re-launch is then not held to the
    failed config. Its train.log stays, with the error."""
    shutil.rmtree(out_dir / HYDRA_DIR, ignore_errors=True)
    for name in (RUN_CONFIG, STATUS_FILE):
        (out_dir / name).unlink(missing_ok=True)
