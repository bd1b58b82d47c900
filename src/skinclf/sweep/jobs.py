"""One sweep job's life: skip it if it already finished, resume it if it did not, and record a
failure instead of letting it abort the whole sweep.

Each job folder gets two small files besides the run's own:
- ``run_config.json``: the resolved config its results belong to; a re-launch compares against it,
  so a folder is never resumed or skipped under a different config.
- ``job_status.json``: running (+ the process and its machine) / done / skipped / failed (+ error
  and log path) / stopped, tagged with the launch that wrote it, for the end-of-sweep summary
  (skinclf.sweep.summary) and ``skinclf report``. Single runs record theirs too
  (:func:`recorded_status`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import HydraContext
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from skinclf.config import data_path
from skinclf.errors import SkinclfError, first_line
from skinclf.io import atomic_write_json, atomic_write_text
from skinclf.run_files import (
    BEST_CHECKPOINT,
    CV_RESULT,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_SETTINGS,
    LAST_CHECKPOINT,
    LAUNCH_FILE,
    METRICS,
    REFUSED_PREFIX,
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
    relative in the checkpoint). Empty when the folder has no readable record (an early run)."""
    try:
        stored = json.loads((Path(run_dir) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return []
    ignored = (*VOLATILE_KEYS, "data.root")
    return [
        key
        for key in _differences(stored, config)
        if key not in ignored and _has_key(stored, key) and _has_key(config, key)
    ]


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
    if isinstance(overrides, list) and all(isinstance(item, str) for item in overrides):
        return overrides
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
    names = (override.split("=", 1)[0].lstrip("+~") for override in overrides)
    return any(name == dotted or name.startswith(f"{dotted}.") for name in names)


def start_launch(sweep_dir: Path) -> str:
    """Tag a new launch into ``sweep_dir``; its jobs record the tag in their status files."""
    launch = uuid.uuid4().hex
    atomic_write_text(launch, Path(sweep_dir) / LAUNCH_FILE)
    return launch


def current_launch(sweep_dir: Path) -> str | None:
    """The tag of the launch running in ``sweep_dir`` (None outside a tagged launch)."""
    path = Path(sweep_dir) / LAUNCH_FILE
    return path.read_text().strip() if path.exists() else None


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


def record_refusal(sweep_dir: Path, out_dir: Path, launch: str | None, **info: Any) -> None:
    """Record a job refused before it ran: its folder holds another config's run, or its settings
    are bad. The record goes beside the folder (``REFUSED_PREFIX``), not into it: a run already
    there keeps its status, and a new folder takes no config that a re-launch would be held to."""
    atomic_write_json({"status": "failed", "launch": launch, **info}, refusal_record(sweep_dir, out_dir))


# A job folder may be nested in its sweep (hydra.sweep.subdir=${model.name}/seed${seed}): its
# refusal record, one file beside the jobs, names the folder's path with "/" spelt as this.
_SLASH = "%2F"


def refusal_record(sweep_dir: Path, out_dir: Path) -> Path:
    """Where the refusal of the job in ``out_dir`` is recorded (see :func:`refused_job_dir`)."""
    try:
        # Both absolute: Hydra makes the job folder absolute, the sweep folder stays as typed.
        name = Path(os.path.abspath(out_dir)).relative_to(os.path.abspath(sweep_dir)).as_posix()
    except ValueError:  # a subdir outside the sweep folder
        name = out_dir.name
    return Path(sweep_dir) / f"{REFUSED_PREFIX}{name.replace('/', _SLASH)}.json"


def refused_job_dir(sweep_dir: Path, record: Path) -> Path:
    """The job folder a refusal record (:func:`refusal_record`) belongs to."""
    name = record.name.removeprefix(REFUSED_PREFIX).removesuffix(".json")
    return Path(sweep_dir) / name.replace(_SLASH, "/")


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
    run that is still going (:func:`process_gone`)."""
    write_status(out_dir, "running", launch, pid=os.getpid(), host=socket.gethostname(), **info)
    try:
        yield
    except Exception as err:
        write_status(out_dir, "failed", launch, error=first_line(err), **info)
        raise
    except BaseException:
        write_status(out_dir, "stopped", launch, **info)
        raise
    write_status(out_dir, "done", launch, **info)


def job_in_training(sweep_dir: Path) -> tuple[Path, int] | None:
    """A job folder of ``sweep_dir`` that a live process on this machine is training in now (an
    earlier launch of the same sweep, still running), with that process's id; None if none."""
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        status = read_status(path.parent)
        if trained_now(status):
            return path.parent, status["pid"]
    return None


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


# How long a stopped sweep's launching process waits for its jobs' processes to end before it
# records the ones that ended unrecorded as stopped (record_stopped_jobs); submitit's local
# executor kills a job 1 s after it passed the stop on.
STOPPED_JOBS_WAIT_S = 5.0


def record_stopped_jobs(sweep_dir: Path, wait_s: float = STOPPED_JOBS_WAIT_S) -> list[Path]:
    """After a stop of the sweep in ``sweep_dir`` (Ctrl-C, `kill`), in the process that launched
    it: record as stopped the jobs of its launch still marked running whose process has ended on
    this machine; returns their folders.

    A launcher may end a job's process before the job could record its stop: submitit's local
    executor (hydra/launcher=submitit_local) passes a Ctrl-C on to its jobs and SIGKILLs them 1 s
    later, and a job inside a long torch operation (a backward pass on one thread) runs no Python
    code, so no signal handler, in that second. ``skinclf report`` would then call the job killed
    (out of memory?). Waits up to ``wait_s`` for those processes to end; one still alive after
    that (a job that goes on, or is still recording its stop) is left to record itself. Only jobs
    whose process was alive when the stop came count: one that died before it (killed by the
    out-of-memory killer while the launcher waited on another job) keeps its "running", which the
    report reads as killed."""
    launch = current_launch(sweep_dir)
    running = [
        path.parent
        for path in Path(sweep_dir).glob(f"**/{STATUS_FILE}")
        if _running_here(status := read_status(path.parent), launch) and not process_gone(status)
    ]
    stopped = []
    deadline = time.monotonic() + wait_s
    try:
        while running:
            for folder in list(running):
                status = read_status(folder)
                # This process's own job (Hydra's basic launcher runs them here) has ended by now.
                ended = _running_here(status, launch) and (
                    status["pid"] == os.getpid() or process_gone(status)
                )
                # Read again once its process is gone: it may have recorded done or failed just
                # before it ended, and nothing can change the file now.
                if ended and _running_here(status := read_status(folder), launch):
                    info = {k: v for k, v in status.items() if k not in {"status", "launch", "pid", "host"}}
                    write_status(folder, "stopped", launch, **info)
                    stopped.append(folder)
                if ended or not _running_here(status, launch):  # recorded, by the job or here
                    running.remove(folder)
            if not running or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass
    return stopped


def _running_here(status: dict[str, Any], launch: str | None) -> bool:
    """Whether ``status`` says running, in ``launch``, a process of this machine."""
    return (
        status.get("status") == "running"
        and status.get("launch") == launch
        and isinstance(status.get("pid"), int)
        and status.get("host") == socket.gethostname()
    )


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


def run_sweep_job(
    cfg: DictConfig,
    out_dir: Path,
    task: Callable[[DictConfig, Path], Any],
    job_num: int,
    sweep_dir: Path,
    overrides: list[str],
    claim: Callable[[Path, DictConfig, list[str]], str] = claim_run_dir,
) -> str:
    """Run ``task`` as sweep job ``job_num`` and return its status ("done", "skipped" or
    "failed"); an error never raises, a stop (Ctrl-C, `kill`) does, recorded as stopped.

    The folder is taken with ``claim`` (:func:`claim_run_dir`, or a caller's version of it that
    checks more first). A finished job of the same config is skipped; an unfinished one resumes
    from its last checkpointed epoch (a re-launch into the same hydra.sweep.dir picks up where it
    stopped). Any error is logged to the job's train.log (with its traceback, unless it is a
    SkinclfError) and recorded, so the remaining jobs still run; the summary at the end of the
    sweep names the failed jobs.
    """
    launch = current_launch(sweep_dir)
    info = {"job": job_num, "overrides": overrides, "log": str(out_dir / TRAIN_LOG)}
    recorded = False
    state = None

    def failed(err: Exception) -> str:
        nonlocal recorded
        message = first_line(err)
        if isinstance(err, FolderBusy):
            # Its train.log (where the job's log lines go) is the other process's: not a word there.
            info["log"] = None
            print(f"skinclf train: job {job_num} failed: {message}", file=sys.stderr)
            record_refusal(sweep_dir, out_dir, launch, error=message, **info)
            return "failed"
        if isinstance(err, SkinclfError):
            log.error(f"job {job_num} failed: {message}")
        else:
            log.exception(f"job {job_num} failed: {type(err).__name__}: {message}")
        print(f"skinclf train: job {job_num} failed: {message} (log: {info['log']})", file=sys.stderr)
        if state == "new" and holds_only_bookkeeping(out_dir):
            # Failed on its data or settings before training anything (a missing data.root): its
            # new folder must not keep the config, or the corrected re-launch would be refused
            # as a different config. Its train.log stays, with the error.
            release_claim(out_dir)
            recorded = False
        if not recorded:  # refused before it ran: the folder is not this job's to write in
            record_refusal(sweep_dir, out_dir, launch, error=message, **info)
        return "failed"

    try:
        with run_dir_lock(out_dir):
            try:
                state = claim(out_dir, cfg, overrides)
                if state == "finished":
                    log.info(f"job {job_num}: already finished in {out_dir}, skipped")
                    write_status(out_dir, "skipped", launch, **info)
                    return "skipped"
                # A re-launch continues an interrupted job from its last checkpointed epoch.
                cfg.resume = bool(cfg.resume) or state == "unfinished"
                recorded = True
                # Ctrl-C or `kill` is recorded as stopped and stops the sweep; a re-launch resumes it.
                with recorded_status(out_dir, launch, **info):
                    task(cfg, out_dir)
            except Exception as err:  # noqa: BLE001 - any failure of one job must not stop the sweep
                # While the folder is still this job's: its claim is released before another
                # process can take the folder.
                return failed(err)
    except FolderBusy as err:  # another process holds the folder: nothing of it is touched
        return failed(err)
    print(f"output directory: {out_dir}")
    return "done"


def record_lost_job(launcher: Any, num: int, overrides: list[str], message: str) -> None:
    """Record job ``num`` of ``launcher``'s sweep, which ended without a word (killed), as failed
    with ``message``: in its job_status.json, or beside its folder if it died before recording
    anything. The sweep summary lists it. (The launcher: this module's, or a submitit one.)"""
    out_dir = job_dir(launcher, num, overrides)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    launch = current_launch(sweep_dir)
    log.error(f"job #{num}: {message}")
    info = {"job": num, "overrides": overrides, "log": str(out_dir / TRAIN_LOG)}
    status = read_status(out_dir)
    if status.get("launch") != launch:
        record_refusal(sweep_dir, out_dir, launch, error=message, **info)
    elif status.get("status") == "running":
        write_status(out_dir, "failed", launch, error=message, **info)


def job_dir(launcher: Any, num: int, overrides: list[str]) -> Path:
    """The folder of job ``num``, as Hydra's run_job names it. Its config is Hydra's current one
    only meanwhile: this process goes on launching, and Hydra's to_absolute_path reads it."""
    hydra_config = HydraConfig.instance()
    launching = hydra_config.cfg
    try:
        config = job_config(launcher.hydra_context, launcher.config, overrides, num)
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
    finally:
        hydra_config.cfg = launching


def job_config(
    hydra_context: HydraContext,
    config: DictConfig,
    overrides: Sequence[str],
    num: int,
    n_jobs: int | None = None,
    slot: int | None = None,
) -> DictConfig:
    """The config of sweep job ``num`` (with ``n_jobs`` and ``slot`` as its hydra.launcher.n_jobs
    and hydra.launcher.slot), made Hydra's current one: ``${hydra:...}`` reads it."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
        sweep_config.hydra.job.num = num
        if n_jobs is not None:
            sweep_config.hydra.launcher.n_jobs = n_jobs
        if slot is not None:  # a key joblib's config schema lacks: added past it
            OmegaConf.update(sweep_config, "hydra.launcher.slot", slot, force_add=True)
    HydraConfig.instance().set_config(sweep_config)
    return sweep_config
