"""`skinclf report [DIR ...] [--out DIR]`: the paper's results section from run folders."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from skinclf.arguments import report_parser
from skinclf.errors import SkinclfError, counted, not_a_folder
from skinclf.io import FILE_NAME_ERRORS, output_folder, python_strings
from skinclf.report.figures import confusion_figure, curves_figure, roc_figure
from skinclf.report.groups import NOT_COUNTED, group_runs
from skinclf.report.runs import (
    FAILED,
    FINISHED,
    UNFINISHED,
    Run,
    check_test_predictions,
    find_runs,
    reads_as_run,
)
from skinclf.report.tables import (
    confusion_table,
    finished,
    runs_table,
    table1,
    table1_latex,
    table1_markdown,
)
from skinclf.run_files import CV_RESULT, FOLDS_RECORD, GRID_MD, HYDRA_CONFIG, METRICS, TEST_METRICS

DPI = 300  # print resolution at the figures' paper size


def build_report(dirs: Sequence[Path], out: Path) -> tuple[list[Run], list[Path]]:
    """Find the runs under ``dirs`` and write every report file into ``out``.

    Returns every run found (whatever its status) and the files written.

    The files are first written to a staging folder inside ``out`` and moved into place only
    when all of them succeeded: a failure never leaves a report half old and half new, nor an
    ``out`` folder that it made and left empty.
    """
    for path in dirs:
        if not Path(path).is_dir():
            raise SkinclfError(
                f"{path}: {not_a_folder(path)}; expected a run or multirun folder of `skinclf train`"
            )
    _check_out_outside_runs(out)
    with output_folder(out), python_strings():  # run folders' names in every table
        runs = find_runs(dirs)
        done = finished(runs)
        if not done:
            raise SkinclfError(_no_finished_runs(dirs, runs))
        groups = group_runs(done)
        # Only the runs drawn: a repeated seed, left out, needs no warning about its file.
        check_test_predictions([run for in_data in groups.values() for g in in_data for run in g.runs])
        table = table1(groups)
        confusion = confusion_table(groups, table)

        with tempfile.TemporaryDirectory(prefix=".report-", dir=out) as staging_dir:
            staging = Path(staging_dir)
            runs_table(runs).to_csv(staging / "runs.csv", index=False, errors=FILE_NAME_ERRORS)
            table.to_csv(staging / "table1.csv", index=False, errors=FILE_NAME_ERRORS)
            # UTF-8 whatever the locale, as every other text skinclf writes.
            (staging / "table1.md").write_text(table1_markdown(table, groups, runs), encoding="utf-8")
            (staging / "table1.tex").write_text(table1_latex(table, groups, runs), encoding="utf-8")
            curves = curves_figure(groups)
            curves.savefig(staging / "curves.png", dpi=DPI)
            # No creation date: the same runs give the same bytes, whenever the report is made.
            curves.savefig(staging / "curves.pdf", metadata={"CreationDate": None})
            if not confusion.empty:
                confusion.to_csv(staging / "confusion_matrix.csv", index=False, errors=FILE_NAME_ERRORS)
                confusion_figure(confusion).savefig(staging / "confusion_matrix.png", dpi=DPI)
            roc = roc_figure(groups)
            if roc is not None:
                roc.savefig(staging / "roc.png", dpi=DPI)
            written = []
            for path in sorted(staging.iterdir()):
                os.replace(path, out / path.name)
                written.append(out / path.name)
            # A figure this report has no data for must not stay behind from an earlier report
            # of other runs: that would pair this Table 1 with their confusion matrix or ROC.
            for name in OPTIONAL_FILES:
                if out / name not in written:
                    (out / name).unlink(missing_ok=True)
    return runs, written


def _check_out_outside_runs(out: Path) -> None:
    """--out must be no run folder, nor lie inside one: the report's roc.png would replace the
    run's own, and its other files would pass for files the run wrote. (Another Hydra
    application's folder, which the report does not read as a run, may hold it.)"""
    target = out.resolve()
    for folder in (target, *target.parents):
        if reads_as_run(folder):
            where = "is" if folder == target else "is inside"
            raise SkinclfError(
                f"--out {out}: {where} the run folder {folder}; expected a folder outside every run folder"
            )


# Written only when the runs have test data.
OPTIONAL_FILES = ("confusion_matrix.csv", "confusion_matrix.png", "roc.png")


def status_counts(runs: Sequence[Run]) -> dict[str, int]:
    """How many of ``runs`` are finished, unfinished and failed."""
    return {status: sum(run.status == status for run in runs) for status in (FINISHED, UNFINISHED, FAILED)}


def _no_finished_runs(dirs: Sequence[Path], runs: Sequence[Run]) -> str:
    """The error when nothing can be reported: what was found instead, with the problem of a
    failed run first (an unreadable file is not the same as a missing one)."""
    found = ""
    if runs:
        counts = ", ".join(f"{n} {status}" for status, n in status_counts(runs).items() if n)
        first = next((run for run in runs if run.status == FAILED), runs[0])
        found = f"; {counted(len(runs), 'run folder')} found ({counts}), e.g. {first.path}: {first.problem}"
    return (
        f"no finished runs found under {', '.join(map(str, dirs))}{found}{_grid_search_hint(dirs)}; "
        f"expected folders written by `skinclf train` (with {HYDRA_CONFIG}, {METRICS} and {TEST_METRICS})"
    )


def _grid_search_hint(dirs: Sequence[Path]) -> str:
    """Where a grid search's result is, when ``dirs`` hold one: its points are cross-validated
    and never tested, so they are no runs of Table 1 and the user is looking for its ranking."""
    rankings = sorted(path for root in dirs for path in Path(root).rglob(GRID_MD))
    if rankings:
        return f"; a cross-validated grid search is never tested: its ranking is in {rankings[0]}"
    # A point's result, or the folds a point records as it starts (the sweep stopped before one
    # was done).
    if any(next(Path(root).rglob(name), None) for root in dirs for name in (CV_RESULT, FOLDS_RECORD)):
        return f"; grid-search points are never tested: the sweep ranks them in {GRID_MD} at its end"
    return ""


def main(args: list[str]) -> None:
    """Entry point of ``skinclf report ARGS``."""
    ns = report_parser().parse_args(args)
    runs, written = build_report(ns.dirs, Path(ns.out))
    for run in runs:
        if run.predictions_problem:  # begins with the file's name: after the folder, its path
            print(
                f"skinclf report: warning: {run.path}{os.sep}{run.predictions_problem}; "
                "its run is left out of roc.png",
                file=sys.stderr,
            )
    counts = {status: f"{n} {status}" for status, n in status_counts(runs).items()}
    repeats = sum(run.problem.startswith(NOT_COUNTED) for run in runs)  # finished runs only have it
    if repeats:  # Table 1's n would not add up to the finished runs
        counts[FINISHED] += f" ({repeats} not counted: seeds run again)"
    print(", ".join(counts.values()) + " run(s); see runs.csv")
    if not any(path.name == "confusion_matrix.csv" for path in written):
        print("no tested runs (no test split): confusion_matrix.* not written")
    if not any(path.name == "roc.png" for path in written):
        print("no readable predictions.csv with test rows: roc.png not written")
    for path in written:
        print(f"wrote {path}")
