"""The end of a sweep: which jobs are done, skipped or failed, and for a grid search the ranking
of its points by cross-validated accuracy. Runs as a Hydra callback (conf/train.yaml,
hydra.callbacks) in the process that launched the sweep, whatever the launcher."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from skinclf.io import atomic_write_json, atomic_write_text, missing_folders, remove_empty_folders
from skinclf.run_files import HYDRA_MULTIRUN, HYDRA_OVERRIDES
from skinclf.sweep.cross_validation import CV_RESULT
from skinclf.sweep.jobs import LAUNCH_FILE, REFUSED_PREFIX, STATUS_FILE, refused_job_dir, start_launch

log = logging.getLogger("skinclf")

GRID_CSV = "grid_search.csv"
GRID_MD = "grid_search.md"
SWEEP_SUMMARY = "sweep_summary.json"


@dataclass
class JobsSummary:
    """Jobs of one launch by outcome; ``failed`` holds (job folder, error, log path)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def format(self, sweep_dir: Path) -> str:
        """The lines printed at the end of a sweep."""
        total = len(self.done) + len(self.skipped) + len(self.failed)
        lines = [
            f"sweep {sweep_dir}: {total} jobs: {len(self.done)} done, {len(self.skipped)} skipped "
            f"(finished before), {len(self.failed)} failed"
        ]
        for failed in self.failed:
            # An error about the job's folder names it already: the folder is not repeated.
            error = str(failed["error"]).removeprefix(f"{failed['dir']}: ")
            lines.append(f"  FAILED {failed['dir']}: {error}\n    log: {failed['log']}")
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
        refused = json.loads(path.read_text())
        if refused.get("launch") == launch:
            records[refused_job_dir(sweep_dir, path)] = path
    for folder in sorted(records, key=_job_order):
        status = json.loads(records[folder].read_text())
        if status.get("launch") != launch:
            continue  # a job of an earlier launch that this one did not touch
        job_dir = str(folder)
        if status["status"] == "done":
            summary.done.append(job_dir)
        elif status["status"] == "skipped":
            summary.skipped.append(job_dir)
        else:
            error = status.get("error", "stopped before finishing (killed?); re-launch to resume it")
            summary.failed.append({"dir": job_dir, "error": error, "log": status.get("log")})
    return summary


def _job_order(folder: Path) -> tuple[int, str]:
    """Job folders start with the job number: sort 2 before 10 (others, nested ones included,
    by path)."""
    head = folder.name.split("_", 1)[0]
    return (int(head), str(folder)) if head.isdigit() else (1 << 30, str(folder))


def rank_grid(sweep_dir: Path) -> pd.DataFrame:
    """One row per cross-validated job in ``sweep_dir``, best first (higher mean validation
    accuracy; on a tie, the lower std). ``point`` names the overrides that differ between jobs."""
    rows = []
    for path in sorted(Path(sweep_dir).glob(f"**/{CV_RESULT}"), key=lambda p: _job_order(p.parent)):
        result = json.loads(path.read_text())
        overrides_file = path.parent / HYDRA_OVERRIDES
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        job = path.parent.relative_to(sweep_dir).as_posix()
        rows.append({"overrides": overrides or [], "dir": job, **result})
    if not rows:
        return pd.DataFrame()
    # Overrides shared by every job (e.g. data.root=...) say nothing about the point: hide them.
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["point"] = " ".join(o for o in r["overrides"] if o not in shared) or "(defaults)"
        r["overrides"] = " ".join(r["overrides"])
    table = pd.DataFrame(rows).sort_values(
        ["mean_val_acc", "std_val_acc"], ascending=[False, True], kind="stable"
    )
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def format_grid(table: pd.DataFrame) -> str:
    """Markdown table of the ranked grid points and a line naming the best one."""
    lines = [
        "| rank | batch size | lr | point | validation accuracy (mean ± std) | folds |",
        "|---:|---:|---:|---|---|---:|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.rank} | {row.batch_size} | {row.lr:g} | {row.point} | "
            f"{100 * row.mean_val_acc:.2f} ± {100 * row.std_val_acc:.2f} % | {row.folds} |"
        )
    best = table.iloc[0]
    lines += [
        "",
        f"Best point: data.batch_size={best['batch_size']} optim.lr={best['lr']:g} ({best['point']}): "
        f"validation accuracy {100 * best['mean_val_acc']:.2f} ± {100 * best['std_val_acc']:.2f} % "
        f"over {best['folds']} folds, job folder {best['dir']}.",
    ]
    return "\n".join(lines)


def remove_unstarted_sweep(sweep_dir: Path | None, created: Sequence[Path] = ()) -> None:
    """Delete a sweep folder that holds nothing but what was written before any job started,
    and the ``created`` folders above it (deepest first) that the launch made and left empty.

    Hydra composes every job's config before it launches the first, so a bad override (a
    misspelt model in ``model=baseline,typo``) stops the sweep right there, leaving only its
    multirun.yaml and the launch tag."""
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    if {p.name for p in sweep_dir.iterdir()} <= {HYDRA_MULTIRUN, LAUNCH_FILE}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        remove_empty_folders(created)


def write_grid(sweep_dir: Path) -> pd.DataFrame:
    """Rank the sweep's grid points; write grid_search.csv and grid_search.md into the sweep folder."""
    table = rank_grid(sweep_dir)
    if table.empty:
        return table
    csv_table = table.copy()
    csv_table["fold_val_acc"] = csv_table["fold_val_acc"].map(lambda accs: " ".join(f"{a:.6f}" for a in accs))
    atomic_write_text(csv_table.to_csv(index=False), Path(sweep_dir) / GRID_CSV)
    text = "# Cross-validated grid search\n\n" + format_grid(table) + "\n"
    atomic_write_text(text, Path(sweep_dir) / GRID_MD)
    return table


class SweepSummary(Callback):
    """Hydra callback: tags each launch, then prints (and writes sweep_summary.json) what its
    jobs did, and ranks grid-search points. ``last`` keeps the summary for the exit code."""

    last: JobsSummary | None = None
    started: Path | None = None  # the sweep folder of the latest launch
    # The folders the latest launch makes above its sweep or single run folder (outputs/multiruns,
    # outputs/runs, ...), deepest first, for removing them again when it is refused before it starts.
    created: list[Path] = []

    def __init__(self) -> None:
        self.launch: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Called before Hydra makes the run folder (the sweep's own case is below).
        SweepSummary.created = missing_folders(Path(config.hydra.run.dir).absolute().parent)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        SweepSummary.created = missing_folders(sweep_dir.parent)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.launch = start_launch(sweep_dir)
        SweepSummary.started = sweep_dir
        # An earlier launch's summary would read as this one's if this launch is interrupted.
        (sweep_dir / SWEEP_SUMMARY).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect_jobs(sweep_dir, self.launch)
        SweepSummary.last = jobs
        atomic_write_json(
            {"done": jobs.done, "skipped": jobs.skipped, "failed": jobs.failed}, sweep_dir / SWEEP_SUMMARY
        )
        table = write_grid(sweep_dir)
        if not table.empty:
            print(f"\n{format_grid(table)}\n(written to {sweep_dir / GRID_MD})")
        print(jobs.format(sweep_dir))
