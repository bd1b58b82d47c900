"""The grid search's result: its points ranked by cross-validated accuracy, written as
grid_search.csv and grid_search.md into the sweep folder at the end of the sweep."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from skinclf.config import is_number, is_searchpath, override_key
from skinclf.io import FILE_NAME_ERRORS, atomic_write_text, python_strings, readable
from skinclf.run_files import CV_RESULT, GRID_CSV, GRID_MD, HYDRA_SETTINGS
from skinclf.run_folder import hydra_record, read_record, recorded, recorded_overrides, string_list
from skinclf.sweep.summary import job_order

log = logging.getLogger("skinclf")


def rank_grid(sweep_dir: Path, failed: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """One row per cross-validated job in ``sweep_dir``, best first (higher mean validation
    accuracy; on a tie, the lower std). ``point`` names the overrides that differ between jobs,
    the ``failed`` ones (the sweep summary's records, with their overrides) included;
    ``train_command`` is the `skinclf train` command line that trains the point for real. A job
    whose cv_result.json or overrides cannot be read (torn, hand-edited) is left out with a
    warning, and named in ``table.attrs["unreadable"]``."""
    rows, unreadable = [], []
    for path in sorted(Path(sweep_dir).glob(f"**/{CV_RESULT}"), key=lambda p: job_order(p.parent)):
        job = path.parent.relative_to(sweep_dir).as_posix()
        result = read_record(path)
        overrides = recorded_overrides(path.parent)
        folders = _config_folders(path.parent / HYDRA_SETTINGS)
        if not _is_cv_result(result) or overrides is None or folders is None:
            log.warning(
                f"{path.parent}: a record of its run ({CV_RESULT}, .hydra/) cannot be read; not ranked"
            )
            unreadable.append(job)
            continue
        command = point_train_command([*folders, *overrides])
        # Its numbers; the environments it ran in stay in the point's own cv_result.json.
        numbers = {
            key: value for key, value in result.items() if key not in ("environment", "fold_environments")
        }
        rows.append({"overrides": overrides, "dir": job, "train_command": command, **numbers})
    if not rows:
        return pd.DataFrame()
    # Overrides shared by every job (e.g. data.root=...) say nothing about the point: hide them.
    everyone = [set(r["overrides"]) for r in rows]
    everyone += [set(string_list(f.get("overrides")) or ()) for f in failed]
    shared = set.intersection(*everyone) if len(everyone) > 1 else set()
    for r in rows:
        # hparams_search=grid is every point's, also where a grid has a single point.
        own = [o for o in r["overrides"] if o not in shared and not o.startswith("hparams_search=")]
        r["point"] = " ".join(own) or "(defaults)"
        r["overrides"] = " ".join(r["overrides"])
    table = pd.DataFrame(rows).sort_values(
        ["mean_val_acc", "std_val_acc"], ascending=[False, True], kind="stable"
    )
    table.insert(0, "rank", range(1, len(table) + 1))
    table = table.reset_index(drop=True)
    table.attrs["unreadable"] = unreadable
    return table


def _is_cv_result(result: dict[str, Any]) -> bool:
    """Whether a cv_result.json holds what the ranking reads: its numbers and the folds' accuracies."""
    numbers = ("mean_val_acc", "std_val_acc", "folds", "batch_size", "lr")
    folds = result.get("fold_val_acc")
    return all(is_number(result.get(key)) for key in numbers) and (
        isinstance(folds, list) and all(is_number(acc) for acc in folds)
    )


def _config_folders(hydra_settings: Path) -> list[str] | None:
    """The config folders a job was given besides skinclf's (a model of the user's own), from its
    .hydra/hydra.yaml: its ``hydra.searchpath`` overrides and ``--config-dir``; None where that
    file is there but unreadable (the command would lose them: "unknown model")."""
    if not hydra_settings.exists():
        return []
    record = hydra_record(hydra_settings)
    if record is None:
        return None
    given = string_list(recorded(record, "hydra.overrides.hydra")) or []
    folders = [o for o in given if is_searchpath(o)]
    sources = recorded(record, "hydra.runtime.config_sources")
    folders += [
        f"--config-dir={source['path'].removeprefix('file://')}"
        for source in (sources if isinstance(sources, list) else [])
        if isinstance(source, dict) and source.get("provider") == "command-line" and source.get("path")
    ]
    return folders


# Overrides that made a job a grid-search point, or are Hydra's or a launch's: not the point's
# run. (hydra.searchpath and --config-dir come back from the job's Hydra record.)
NOT_THE_POINTS = ("hparams_search", "cv", "resume")


def point_train_command(args: Sequence[str]) -> str:
    """The `skinclf train` command line that trains a grid point for real, ready for a shell: the
    job's config folders and overrides (its model, data, batch size and learning rate as given)
    without those that made it a grid-search job (hparams_search, cv: cross-validating it again),
    resume, or Hydra's own."""
    kept = []
    for arg in args:
        key = override_key(arg)
        own_hydra = key.startswith(("hydra.", "hydra/")) and not is_searchpath(arg)
        if key in NOT_THE_POINTS or key.startswith("cv.") or own_hydra:
            continue
        kept.append(arg)
    return " ".join(["skinclf train", *map(shlex.quote, kept)])


def format_grid(
    table: pd.DataFrame, failed: Sequence[dict[str, Any]] = (), earlier: Sequence[dict[str, Any]] = ()
) -> str:
    """Markdown table of the ranked grid points and a line naming the best one; the ``failed``
    points (the sweep summary's records) named after it: the best is only of those that ran. The
    ``earlier`` points failed in this launch too, but are ranked by an earlier launch's result."""
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
        f"Best point: {best['point']}: validation accuracy {100 * best['mean_val_acc']:.2f} ± "
        f"{100 * best['std_val_acc']:.2f} % over {best['folds']} folds, job folder {best['dir']}.",
        f"Train it: `{best['train_command']}`",
    ]
    unreadable = table.attrs.get("unreadable") or []
    if unreadable:
        lines += [
            "",
            f"Left out: {', '.join(unreadable)} (a record of its run, {CV_RESULT} or .hydra/, "
            "cannot be read).",
        ]
    if failed:
        names = ", ".join(Path(f["dir"]).name for f in failed)
        lines += [
            "",
            f"Not ranked: {len(failed)} of the {len(table) + len(unreadable) + len(failed)} points failed "
            f"({names}; "
            "the sweep's summary says why): the best point is the best of the rest.",
        ]
    if earlier:
        # A re-launch refused for a changed setting (cv.folds) keeps the old results: say whose.
        names = ", ".join(Path(f["dir"]).name for f in earlier)
        lines += [
            "",
            f"From an earlier launch: {names} failed in this one (the sweep's summary says why) and "
            f"{'is' if len(earlier) == 1 else 'are'} ranked by the result held from before.",
        ]
    return "\n".join(lines)


def failed_points(failed: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``failed`` points split into those without a result and those that hold a result of an
    earlier launch, which ranks them (named as such, not as missing)."""
    held = [f for f in failed if (Path(f["dir"]) / CV_RESULT).is_file()]
    return [f for f in failed if f not in held], held


def write_grid(sweep_dir: Path, failed: Sequence[dict[str, Any]] = ()) -> str:
    """Rank the sweep's grid points; write grid_search.csv and grid_search.md into the sweep folder
    (the ``failed`` points named in the latter). Returns the ranking's text for the console; ""
    when no point has a result (nothing written)."""
    failed, earlier = failed_points(failed)
    with python_strings():  # overrides may name paths whose bytes are no UTF-8
        table = rank_grid(sweep_dir, failed)
        if table.empty:
            return ""
        csv_table = table.copy()
        csv_table["fold_val_acc"] = csv_table["fold_val_acc"].map(
            lambda accs: " ".join(f"{a:.6f}" for a in accs)
        )
        # The CSV keeps such a path's bytes (train_command finds the folder again); the Markdown,
        # text for people, shows them escaped, as the report's tables do.
        atomic_write_text(csv_table.to_csv(index=False), Path(sweep_dir) / GRID_CSV, errors=FILE_NAME_ERRORS)
        text = format_grid(table, failed, earlier)
    atomic_write_text(readable(f"# Cross-validated grid search\n\n{text}\n"), Path(sweep_dir) / GRID_MD)
    return text
