"""One sweep job's life: skip it if it already finished, resume it if it did not, and record a
failure instead of letting it abort the whole sweep; and the records of a sweep's launches: its
tag, the jobs refused before they ran, the jobs a stop ended unrecorded.

A job's folder is a run folder like a single run's (skinclf.run_folder: its config record, its
status, the claim on it); each launch into a sweep folder is tagged (``LAUNCH_FILE``), and its
jobs' status files carry the tag, so that the end-of-sweep summary counts this launch's jobs only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from skinclf.errors import SkinclfError, first_line, out_of_space
from skinclf.io import atomic_write_json, atomic_write_text
from skinclf.run_files import LAUNCH_FILE, REFUSED_PREFIX, STATUS_FILE, TRAIN_LOG
from skinclf.run_folder import (
    FolderBusy,
    claim_run_dir,
    holds_only_bookkeeping,
    log_to_file_only,
    process_gone,
    read_status,
    recorded_status,
    release_claim,
    run_dir_lock,
    trained_now,
    write_status,
)

log = logging.getLogger("skinclf")


def start_launch(sweep_dir: Path) -> str:
    """Tag a new launch into ``sweep_dir``; its jobs record the tag in their status files."""
    launch = uuid.uuid4().hex
    atomic_write_text(launch, Path(sweep_dir) / LAUNCH_FILE)
    return launch


def current_launch(sweep_dir: Path) -> str | None:
    """The tag of the launch running in ``sweep_dir`` (None outside a tagged launch)."""
    path = Path(sweep_dir) / LAUNCH_FILE
    return path.read_text().strip() if path.exists() else None


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


def job_in_training(sweep_dir: Path) -> tuple[Path, int] | None:
    """A job folder of ``sweep_dir`` that a live process on this machine is training in now (an
    earlier launch of the same sweep, still running), with that process's id; None if none."""
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        status = read_status(path.parent)
        if trained_now(status):
            return path.parent, status["pid"]
    return None


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
        err = out_of_space(err) or err  # a full disk: its line, not a library's traceback
        message = first_line(err)
        if isinstance(err, FolderBusy):
            # Its train.log (where the job's log lines go) is the other process's: not a word there.
            info["log"] = None
            print(f"skinclf train: job {job_num} failed: {message}", file=sys.stderr)
            with contextlib.suppress(OSError):  # see below
                record_refusal(sweep_dir, out_dir, launch, error=message, **info)
            return "failed"
        # Into the job's train.log (a crash with its traceback); the console gets the one line
        # below, not the log line too.
        if isinstance(err, SkinclfError):
            log_to_file_only(f"job {job_num} failed: {message}")
        else:
            log_to_file_only(f"job {job_num} failed: {type(err).__name__}: {message}", exc_info=err)
        print(f"skinclf train: job {job_num} failed: {message} (log: {info['log']})", file=sys.stderr)
        # Best effort: on a full disk (a checkpoint's error is a SkinclfError by then) these writes
        # fail too, and a job's failure must not end the sweep; its line above is then all there is.
        with contextlib.suppress(OSError):
            if state == "new" and holds_only_bookkeeping(out_dir):
                # Failed on its data or settings before training anything (a missing data.root):
                # its new folder must not keep the config, or the corrected re-launch would be
                # refused as a different config. Its train.log stays, with the error. The refusal
                # is recorded first: if it cannot be, the folder keeps its own record of the failure.
                record_refusal(sweep_dir, out_dir, launch, error=message, **info)
                release_claim(out_dir)
            elif not recorded:  # refused before it ran: the folder is not this job's to write in
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
