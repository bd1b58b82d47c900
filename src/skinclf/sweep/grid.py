"""The grid search's result: its points ranked by cross-validated accuracy, written as
grid_search.csv and grid_search.md into the sweep folder at the end of the sweep."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from skinclf.io import atomic_write_text
from skinclf.run_files import CV_RESULT, GRID_CSV, GRID_MD, HYDRA_OVERRIDES
from skinclf.sweep.jobs import read_record
from skinclf.sweep.summary import job_order

log = logging.getLogger("skinclf")


def rank_grid(sweep_dir: Path, failed: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """One row per cross-validated job in ``sweep_dir``, best first (higher mean validation
    accuracy; on a tie, the lower std). ``point`` names the overrides that differ between jobs,
    the ``failed`` ones (the sweep summary's records, with their overrides) included;
    ``train_command`` is the `skinclf train` command line that trains the point for real. A job
    whose result cannot be read (a torn or hand-edited cv_result.json) is left out, with a warning."""
    rows = []
    for path in sorted(Path(sweep_dir).glob(f"**/{CV_RESULT}"), key=lambda p: job_order(p.parent)):
        result = read_record(path)
        if not all(isinstance(result.get(key), int | float) for key in RESULT_NUMBERS):
            log.warning(f"{path}: unreadable, or not a cross-validation result; its point is not ranked")
            continue
        overrides = _overrides(path.parent / HYDRA_OVERRIDES)
        job = path.parent.relative_to(sweep_dir).as_posix()
        rows.append({"overrides": overrides, "dir": job, **result})
    if not rows:
        return pd.DataFrame()
    # Overrides shared by every job (e.g. data.root=...) say nothing about the point: hide them.
    everyone = [set(r["overrides"]) for r in rows] + [set(_strings(f.get("overrides"))) for f in failed]
    shared = set.intersection(*everyone) if len(everyone) > 1 else set()
    for r in rows:
        # hparams_search=grid is every point's, also where a grid has a single point.
        own = [o for o in r["overrides"] if o not in shared and not o.startswith("hparams_search=")]
        r["point"] = " ".join(own) or "(defaults)"
        r["train_command"] = train_command(r["overrides"])
        r["overrides"] = " ".join(r["overrides"])
    table = pd.DataFrame(rows).sort_values(
        ["mean_val_acc", "std_val_acc"], ascending=[False, True], kind="stable"
    )
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


# What a point's cv_result.json must hold to be ranked.
RESULT_NUMBERS = ("mean_val_acc", "std_val_acc", "folds", "batch_size", "lr")


def _overrides(path: Path) -> list[str]:
    """A job's command-line overrides (.hydra/overrides.yaml); none where missing or unreadable."""
    try:
        return _strings(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, yaml.YAMLError):
        return []


def _strings(value: object) -> list[str]:
    """``value`` as a list of overrides: empty unless it is a list of strings."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return []


def train_command(overrides: Sequence[str]) -> str:
    """The `skinclf train` command line that trains a grid point for real, ready for a shell: the
    job's overrides (its model, data, batch size and learning rate as given) without those that
    made it a grid-search job (hparams_search, cv.*: cross-validating it again) or Hydra's."""
    kept = [
        override
        for override in overrides
        if not override.lstrip("+~").startswith(("hparams_search=", "cv.", "hydra.", "hydra/"))
    ]
    return " ".join(["skinclf train", *map(shlex.quote, kept)])


def format_grid(table: pd.DataFrame, failed: Sequence[dict[str, Any]] = ()) -> str:
    """Markdown table of the ranked grid points and a line naming the best one; the ``failed``
    points (the sweep summary's records) named after it: the best is only of those that ran."""
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
    if failed:
        names = ", ".join(Path(f["dir"]).name for f in failed)
        lines += [
            "",
            f"Not ranked: {len(failed)} of the {len(table) + len(failed)} points failed ({names}; "
            "the sweep's summary says why): the best point is the best of the rest.",
        ]
    return "\n".join(lines)


def unranked(failed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``failed`` points without a result: one that failed in this launch but holds a result
    of an earlier launch is ranked by that result, not named as missing."""
    return [f for f in failed if not (Path(f["dir"]) / CV_RESULT).is_file()]


def write_grid(sweep_dir: Path, failed: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """Rank the sweep's grid points; write grid_search.csv and grid_search.md into the sweep folder
    (the ``failed`` points named in the latter)."""
    failed = unranked(failed)
    table = rank_grid(sweep_dir, failed)
    if table.empty:
        return table
    csv_table = table.copy()
    csv_table["fold_val_acc"] = csv_table["fold_val_acc"].map(lambda accs: " ".join(f"{a:.6f}" for a in accs))
    atomic_write_text(csv_table.to_csv(index=False), Path(sweep_dir) / GRID_CSV)
    text = "# Cross-validated grid search\n\n" + format_grid(table, failed) + "\n"
    atomic_write_text(text, Path(sweep_dir) / GRID_MD)
    return table
