"""The grid search's result: its points ranked by cross-validated accuracy, written as
grid_search.csv and grid_search.md into the sweep folder at the end of the sweep."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from skinclf.io import atomic_write_text
from skinclf.run_files import CV_RESULT, GRID_CSV, GRID_MD, HYDRA_OVERRIDES
from skinclf.sweep.summary import job_order


def rank_grid(sweep_dir: Path, failed: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """One row per cross-validated job in ``sweep_dir``, best first (higher mean validation
    accuracy; on a tie, the lower std). ``point`` names the overrides that differ between jobs,
    the ``failed`` ones (the sweep summary's records, with their overrides) included."""
    rows = []
    for path in sorted(Path(sweep_dir).glob(f"**/{CV_RESULT}"), key=lambda p: job_order(p.parent)):
        result = json.loads(path.read_text())
        overrides_file = path.parent / HYDRA_OVERRIDES
        overrides = (
            yaml.safe_load(overrides_file.read_text(encoding="utf-8")) if overrides_file.exists() else []
        )
        job = path.parent.relative_to(sweep_dir).as_posix()
        rows.append({"overrides": overrides or [], "dir": job, **result})
    if not rows:
        return pd.DataFrame()
    # Overrides shared by every job (e.g. data.root=...) say nothing about the point: hide them.
    everyone = [set(r["overrides"]) for r in rows] + [set(f.get("overrides") or []) for f in failed]
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
    return table.reset_index(drop=True)


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
        f"Best point: {' '.join(train_overrides(best))}: validation accuracy "
        f"{100 * best['mean_val_acc']:.2f} ± {100 * best['std_val_acc']:.2f} % over {best['folds']} "
        f"folds, job folder {best['dir']}.",
    ]
    if failed:
        names = ", ".join(Path(f["dir"]).name for f in failed)
        lines += [
            "",
            f"Not ranked: {len(failed)} of the {len(table) + len(failed)} points failed ({names}; "
            "the sweep's summary says why): the best point is the best of the rest.",
        ]
    return "\n".join(lines)


def train_overrides(point: pd.Series) -> list[str]:
    """What to give `skinclf train` to train a ranked ``point`` for real: its batch size and
    learning rate, and the other overrides that tell it from the other points (model=resnet),
    without cross-validation's own (cv.folds would cross-validate it again)."""
    others = [
        override
        for override in str(point["point"]).split()
        if override != "(defaults)"
        and override.split("=", 1)[0].lstrip("+~") not in {"data.batch_size", "optim.lr"}
        and not override.lstrip("+~").startswith("cv.")
    ]
    return [f"data.batch_size={point['batch_size']}", f"optim.lr={point['lr']:g}", *others]


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
