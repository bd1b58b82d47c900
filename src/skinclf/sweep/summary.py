"""The end of a sweep: which jobs are done, skipped or failed, and for a grid search the ranking
of its points (:mod:`skinclf.sweep.grid`). Runs as a Hydra callback (conf/train.yaml,
hydra.callbacks) in the process that launched the sweep, whatever the launcher; only
``on_job_start`` runs in each job's process."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from skinclf.errors import exit_with_error, out_of_space
from skinclf.io import atomic_write_json, missing_folders, remove_empty_folders
from skinclf.run_files import (
    GRID_MD,
    HYDRA_MULTIRUN,
    LAUNCH_FILE,
    REFUSED_PREFIX,
    STATUS_FILE,
    SWEEP_SUMMARY,
    TRAIN_LOG,
)
from skinclf.run_folder import read_record
from skinclf.sweep.jobs import job_in_training, refused_job_dir, start_launch

log = logging.getLogger("skinclf")


@dataclass
class JobsSummary:
    """Jobs of one launch by outcome: job folders; ``failed`` holds dicts of the job's ``dir``,
    ``error``, ``log`` (its train.log) and ``overrides``."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)

    def format(self, sweep_dir: Path) -> str:
        """The lines printed at the end of a sweep."""
        lines = [
            f"sweep {sweep_dir}: {self.total} jobs: {len(self.done)} done, {len(self.skipped)} skipped "
            f"(finished before), {len(self.failed)} failed"
        ]
        for failed in self.failed:
            # An error about the job's folder names it already: the folder is not repeated.
            error = str(failed["error"]).removeprefix(f"{failed['dir']}: ")
            log = f"\n    log: {failed['log']}" if failed.get("log") else ""  # none: another's folder
            lines.append(f"  FAILED {failed['dir']}: {error}{log}")
        return "\n".join(lines)


def collect_jobs(sweep_dir: Path, launch: str | None) -> JobsSummary:
    """Outcomes of the jobs that ``launch`` ran in ``sweep_dir`` (from their job_status.json).

    A job still marked running when the sweep is over died without reporting (killed, out of
    memory, Slurm time limit): it counts as failed, and a re-launch resumes it.
    """
    summary = JobsSummary()
    sweep_dir = Path(sweep_dir)
    # job folder -> its status file; a refused job's record lies beside its folder, not in it.
    # Job folders may be nested (hydra.sweep.subdir=${model.name}/seed${seed}).
    records = {path.parent: path for path in sweep_dir.glob(f"**/{STATUS_FILE}")}
    for path in sweep_dir.glob(f"{REFUSED_PREFIX}*.json"):
        if read_record(path).get("launch") == launch:
            records[refused_job_dir(sweep_dir, path)] = path
    for folder in sorted(records, key=job_order):
        status = read_record(records[folder])
        if status.get("launch") != launch:
            # A job of an earlier launch that this one did not touch, or an unreadable record
            # (which names no launch): counted by nobody, rather than ending the summary.
            continue
        job_dir = str(folder)
        if status.get("status") == "done":
            summary.done.append(job_dir)
        elif status.get("status") == "skipped":
            summary.skipped.append(job_dir)
        else:
            # "stopped": the job recorded its stop (Ctrl-C, `kill`, a Slurm requeue); "running":
            # it was killed outright (or trains on, on another machine).
            stopped = "stopped" if status.get("status") == "stopped" else "stopped before finishing (killed?)"
            error = status.get("error", f"{stopped}; re-launch to resume it")
            summary.failed.append(
                {
                    "dir": job_dir,
                    "error": error,
                    "log": status.get("log"),
                    "overrides": status.get("overrides"),
                }
            )
    return summary


def job_order(folder: Path) -> tuple[int, str]:
    """Job folders start with the job number: sort 2 before 10 (others, nested ones included,
    by path)."""
    head = folder.name.split("_", 1)[0]
    return (int(head), str(folder)) if head.isdigit() else (1 << 30, str(folder))


def remove_unstarted(folder: Path | None, created: Sequence[Path] = ()) -> None:
    """Delete a run or sweep folder that the launch made (``SweepSummary.started``) if it holds
    nothing but what was written before any run started, and the ``created`` folders above it
    (deepest first) that the launch made and left empty.

    Hydra composes every job's config before it launches the first, so a bad override (a
    misspelt model in ``model=baseline,typo``) stops the sweep right there, leaving only its
    multirun.yaml and the launch tag. A run (or job) stopped while it imports torch, after Hydra
    made its folder and before skinclf claimed it, leaves only its log there."""
    if folder is None or not folder.is_dir():
        return
    files = (p for p in folder.rglob("*") if not p.is_dir())
    if all(p.name in {HYDRA_MULTIRUN, LAUNCH_FILE, TRAIN_LOG} for p in files):
        shutil.rmtree(folder, ignore_errors=True)
        remove_empty_folders(created)


class SweepSummary(Callback):
    """Hydra callback: tags each launch, then prints (and writes sweep_summary.json) what its
    jobs did, and ranks grid-search points. ``last`` keeps the summary for the exit code."""

    last: JobsSummary | None = None
    # The folder the latest launch made: its sweep's, or its single run's (None if it existed: a
    # folder the user named may be removed only if this launch made it).
    started: Path | None = None
    # The latest sweep's folder, whoever made it: printed when a stop (Ctrl-C, kill) leaves it.
    sweep_dir: Path | None = None
    # The folders the latest launch makes above its sweep or single run folder (outputs/multiruns,
    # outputs/runs, ...), deepest first, for removing them again when it is refused before it starts.
    created: list[Path] = []

    def __init__(self) -> None:
        self.launch: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Called before Hydra makes the run folder (the sweep's own case is below). Made absolute
        # as Hydra makes hydra.runtime.output_dir, which the run compares with it.
        run_dir = Path(os.path.abspath(config.hydra.run.dir))
        SweepSummary.created = missing_folders(run_dir.parent)
        SweepSummary.started = None if run_dir.exists() else run_dir

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        busy = job_in_training(sweep_dir) if sweep_dir.is_dir() else None
        if busy is not None:
            # Its launch tag and summary would be overwritten, and its jobs refused or raced for.
            exit_with_error(
                "train",
                f"{sweep_dir}: job {busy[0].name} is being trained now by process {busy[1]} on this "
                "machine (another launch of this sweep); wait for that launch to end, then launch again "
                "to continue the sweep (if that process is not skinclf, its id reused after a crash, "
                f"delete {busy[0] / STATUS_FILE})",
            )
        SweepSummary.created = missing_folders(sweep_dir.parent)
        SweepSummary.started = None if sweep_dir.exists() else sweep_dir
        SweepSummary.sweep_dir = sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.launch = start_launch(sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # An earlier launch's summary would read as this one's if this launch is interrupted. It
        # goes once a job starts: Hydra checks every job's overrides before it starts the first,
        # so a launch refused for a typo (model=baseline,resnt) leaves a finished sweep's summary.
        # In the job's process (local, Slurm launchers), hence from the job's config.
        if config.hydra.mode == RunMode.MULTIRUN:
            (Path(config.hydra.sweep.dir) / SWEEP_SUMMARY).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect_jobs(sweep_dir, self.launch)
        if jobs.total == 0 and not any(p.is_dir() for p in sweep_dir.iterdir()):
            # A sweep value that expanded to nothing ran no job (caught before Hydra, but for a
            # glob over configs of the user's own); a summary of "0 jobs" and exit 0 would read
            # as success. main() then removes the folder this launch made.
            exit_with_error(
                "train",
                f"{sweep_dir}: the sweep has no jobs: a swept value expanded to nothing (a glob(...) "
                "that matches no config, an empty range(...))",
            )
        SweepSummary.last = jobs
        # Imported here: pandas takes ~0.4 s, which `skinclf train --help`, a config error and
        # every single run would pay for a table that only a grid search writes.
        from skinclf.sweep.grid import write_grid

        try:
            atomic_write_json(
                {"done": jobs.done, "skipped": jobs.skipped, "failed": jobs.failed}, sweep_dir / SWEEP_SUMMARY
            )
            ranking = write_grid(sweep_dir, jobs.failed)
        except OSError as err:  # a full disk: Hydra would print a traceback
            full = out_of_space(err)
            if full is None:
                raise
            print(jobs.format(sweep_dir))  # what the jobs did, though it cannot be written down
            exit_with_error("train", f"{sweep_dir}: the sweep's summary: {full}")
        if ranking:
            print(f"\n{ranking}\n(written to {sweep_dir / GRID_MD})")
        print(jobs.format(sweep_dir))
