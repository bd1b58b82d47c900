"""The report's tables: every run (runs.csv), paper Table 1 and Table 2 (the confusion matrix).

Accuracies are in % like the paper's Table 1; F1, sensitivity, specificity and ROC AUC are
fractions like its text. Several runs of one group (seeds) give mean and sample std (ddof=1).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pandas as pd

from skinclf.errors import counted
from skinclf.report.groups import Group, common_settings
from skinclf.report.runs import FINISHED, Run, describe_dataset

# Per-run metrics that Table 1 aggregates: (column, header in md/tex, decimals shown for one run
# and for a mean over several; an epoch of one run is a whole number, a mean of epochs is not).
TABLE1_METRICS = (
    ("best_val_acc_pct", "Validation (%)", (2, 2)),
    ("max_train_acc_pct", "Training (%)", (2, 2)),
    ("best_epoch", "Best epoch", (0, 1)),
    ("epochs_run", "Epochs", (0, 1)),
    ("test_acc_pct", "Test (%)", (2, 2)),
    ("roc_auc", "Test ROC AUC", (3, 3)),
)
TEST_KEYS = ("f1", "sensitivity", "specificity", "roc_auc")
CLASSES = ("NEV", "MEL")  # the paper's names; row/column 0 is the negative class
DECIMALS = 4  # in the CSV files: enough to recompute any shown number


def run_metrics(run: Run) -> dict:
    """One run's key numbers (NaN where it has none, e.g. no test split or no epoch yet)."""
    history, test = run.history, run.test if run.tested else {}
    has_epochs = history is not None and not history.empty
    best_epoch = run.best_epoch if has_epochs else math.nan
    best_val_acc = history["val_acc"].max() if has_epochs else math.nan
    if run.status == FINISHED and run.test and "best_epoch" in run.test:
        # The checkpoint that was tested, as the run recorded it. metrics.csv agrees, except after
        # a GPU resume whose redone epochs did not reproduce the interrupted attempt's best.pt
        # (see skinclf.train.run): then only the record matches the test numbers.
        best_epoch, best_val_acc = run.test["best_epoch"], run.test["best_val_acc"]
    return {
        "epochs_run": len(history) if has_epochs else 0,
        "best_epoch": best_epoch,
        "best_val_acc_pct": 100 * best_val_acc,
        "max_train_acc_pct": 100 * history["train_acc"].max() if has_epochs else math.nan,
        "test_acc_pct": 100 * test["accuracy"] if "accuracy" in test else math.nan,
        **{key: float(test.get(key, math.nan)) for key in TEST_KEYS},
        "n_test": int(test.get("n_test", 0)),
    }


# Of a run's recorded environment (test_metrics.json), what runs.csv shows.
ENVIRONMENT_COLUMNS = ("source", "torch", "machine")


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """runs.csv: every run found, finished or not, with its status and key metrics."""
    rows = [
        {
            "run_dir": str(run.path),
            "status": run.status,
            "data": run.data,
            "model": run.model,
            "seed": run.seed,
            "settings": " ".join(f"{k}={v}" for k, v in sorted(run.settings.items())),
            **run_metrics(run),
            "problem": run.problem,
            # What produced the numbers (absent from runs made before skinclf recorded it).
            **{key: (run.test or {}).get("environment", {}).get(key) for key in ENVIRONMENT_COLUMNS},
        }
        for run in runs
    ]
    table = pd.DataFrame(rows).round(DECIMALS)
    # Whole numbers even beside a run without one (an unreadable config, a refused job, a run
    # with no epoch yet): pandas would otherwise write every seed as 0.0.
    return table.astype({key: "Int64" for key in ("seed", "epochs_run", "best_epoch", "n_test")})


def table1(groups: dict[str, list[Group]]) -> pd.DataFrame:
    """Table 1 per dataset: mean, std and n of each metric per group; ``best`` marks the row
    with the highest mean best validation accuracy of its dataset (ties: the earlier row)."""
    rows = []
    for data, data_groups in groups.items():
        for group in data_groups:
            values = pd.DataFrame([run_metrics(run) for run in group.runs])
            row = {"data": data, "model": group.model, "variant": group.variant, "n": len(group.runs)}
            for column, _, _ in TABLE1_METRICS:
                row[f"{column}_mean"] = values[column].mean()
                row[f"{column}_std"] = values[column].std()  # NaN for one run: no spread to report
            row["n_tested"] = int((values["n_test"] > 0).sum())
            rows.append(row)
    table = pd.DataFrame(rows).round(DECIMALS)
    # Chosen on the means as written, as confusion_table chooses from this table: equal means
    # (seeds at 96 and 99 % against 97 and 98 %) can differ in their last float bits, which
    # would bold the later row while the confusion matrix showed the earlier one.
    table["best"] = False
    for _, in_data in table.groupby("data", sort=False):
        table.loc[in_data["best_val_acc_pct_mean"].idxmax(), "best"] = True  # ties: the first
    return table


def best_tested_run(groups: list[Group], table: pd.DataFrame) -> tuple[Group, Run] | None:
    """The model with the best validation accuracy among those tested, and its run to show.

    With several seeds, the run shown is the one with the best validation accuracy: the choice
    uses validation data only, like the paper's choice of the checkpoint to test.
    """
    rows = table.set_index(["model", "variant"])
    tested = [g for g in groups if any(run.tested for run in g.runs)]
    if not tested:
        return None
    group = max(
        tested, key=lambda g: (rows.loc[(g.model, g.variant), "best_val_acc_pct_mean"], -tested.index(g))
    )
    runs = [run for run in group.runs if run.tested]
    run = max(runs, key=lambda r: (run_metrics(r)["best_val_acc_pct"], -runs.index(r)))
    return group, run


def confusion_table(groups: dict[str, list[Group]], table: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 2 per dataset: rows true NEV/MEL, columns predicted NEV/MEL, for the best model's
    test set, with its accuracy, F1, sensitivity, specificity and ROC AUC beside the counts; the
    run shown (its folder, its seed, of how many tested runs of that model)."""
    rows = []
    for data, data_groups in groups.items():
        chosen = best_tested_run(data_groups, table[table["data"] == data])
        if chosen is None:
            continue
        group, run = chosen
        c = run.test["confusion"]
        scores = {"accuracy": run.test["accuracy"], **{k: run.test.get(k, math.nan) for k in TEST_KEYS}}
        # Which of the row's seeds it is: the one with the best validation accuracy, not their mean.
        tested = sum(r.tested for r in group.runs)
        common = {
            "data": data,
            "model": group.label,
            "run_dir": str(run.path),
            "seed": run.seed,
            "of_runs": tested,
        }
        rows.append({**common, "true": "NEV", "pred_NEV": c["tn"], "pred_MEL": c["fp"], **scores})
        rows.append({**common, "true": "MEL", "pred_NEV": c["fn"], "pred_MEL": c["tp"], **scores})
    table = pd.DataFrame(rows).round(DECIMALS)
    if not table.empty:  # whole numbers, empty where a run has none (an older run's config)
        table["seed"] = table["seed"].astype("Int64")
    return table


def _cell(mean: float, std: float, n: int, decimals: tuple[int, int]) -> str:
    if pd.isna(mean):
        return "–"
    if n > 1 and not pd.isna(std):
        return f"{mean:.{decimals[1]}f} ± {std:.{decimals[1]}f}"
    return f"{mean:.{decimals[0]}f}"


def _display_rows(table: pd.DataFrame) -> list[tuple[list[str], bool]]:
    """(cells, is_best) per row of one dataset's Table 1, as shown in md/tex."""
    out = []
    for _, row in table.iterrows():
        label = f"{row['model']} [{row['variant']}]" if row["variant"] else row["model"]
        cells = [label, str(row["n"])]
        for column, _, decimals in TABLE1_METRICS:
            n = row["n_tested"] if column in {"test_acc_pct", "roc_auc"} else row["n"]
            cells.append(_cell(row[f"{column}_mean"], row[f"{column}_std"], n, decimals))
        out.append((cells, bool(row["best"])))
    return out


HEADERS = ["Model", "n", *(header for _, header, _ in TABLE1_METRICS)]


def _dataset_note(groups: list[Group]) -> str:
    """The settings every run of a dataset shares, which the rows then leave out."""
    shared = common_settings(run for g in groups for run in g.runs)
    settings = " ".join(f"{k}={v}" for k, v in sorted(shared.items()))
    if settings:
        return f"Settings of every run: {settings}."
    if any(group.variant for group in groups):
        return "No setting is shared by every run: each row names its own (none: the defaults)."
    return "All runs with the default settings."


def _left_out_note(runs: Sequence[Run], data: str) -> str:
    """The runs of dataset ``data`` that the table leaves out (failed, unfinished), by model: the
    mean of a row is that of the seeds that finished, which the others could have lowered."""
    counts = Counter((run.status, run.model) for run in runs if run.data == data and run.status != FINISHED)
    parts = [f"{counted(n, f'{status} run')} of {model}" for (status, model), n in sorted(counts.items())]
    return f"Not in the table: {', '.join(parts)} (runs.csv says why)." if parts else ""


def _unknown_dataset_note(runs: Sequence[Run]) -> str:
    """Failed runs of no known model or dataset: a damaged config, a sweep job refused before it ran."""
    n = sum(run.data == "?" for run in runs)
    if not n:
        return ""
    failed = counted(n, "failed run")
    return f"Also found: {failed} of no known model or dataset (a damaged record, a refused job: runs.csv)."


def table1_markdown(table: pd.DataFrame, groups: dict[str, list[Group]], runs: Sequence[Run] = ()) -> str:
    """table1.md: one section per dataset, the best model in bold; ``runs``: every run found,
    whose failed and unfinished ones are named under their dataset's table."""
    parts = ["# Table 1: validation and training accuracies", ""]
    if unknown := _unknown_dataset_note(runs):
        parts += [unknown, ""]
    for data, data_groups in groups.items():
        parts += [f"## Dataset: {describe_dataset(data)}", "", _dataset_note(data_groups), ""]
        parts.append("| " + " | ".join(HEADERS) + " |")
        parts.append("|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|")
        for cells, best in _display_rows(table[table["data"] == data]):
            parts.append("| " + " | ".join(f"**{c}**" if best else c for c in cells) + " |")
        parts += ["", _footnote(), ""]
        if left_out := _left_out_note(runs, data):
            parts += [left_out, ""]
    for data in _datasets_without_table(runs, groups):
        parts += [
            f"## Dataset: {describe_dataset(data)}",
            "",
            f"No finished run. {_left_out_note(runs, data)}",
            "",
        ]
    return "\n".join(parts)


def _datasets_without_table(runs: Sequence[Run], groups: dict[str, list[Group]]) -> list[str]:
    """The datasets of ``runs`` with no finished run, which no table shows (known datasets only)."""
    return sorted({run.data for run in runs if run.data != "?" and run.data not in groups})


def _footnote() -> str:
    return (
        "Best validation and highest training accuracy over the epochs; mean ± std over the n runs "
        "(seeds) of a row; test metrics of the best-validation checkpoint. Bold: highest validation accuracy."
    )


# LaTeX's special characters in text mode, each replaced in one pass (so no escape is escaped
# again): a backslash would start a command, "^" and "~" would be a superscript and a space.
_TEX_ESCAPES = str.maketrans(
    {
        **{char: "\\" + char for char in "&%$#_{}"},
        "\\": "\\textbackslash{}",
        "^": "\\textasciicircum{}",
        "~": "\\textasciitilde{}",
        "±": "$\\pm$",
        "–": "--",
    }
)


def _tex_escape(text: str) -> str:
    return text.translate(_TEX_ESCAPES)


def table1_latex(table: pd.DataFrame, groups: dict[str, list[Group]], runs: Sequence[Run] = ()) -> str:
    """table1.tex: one booktabs ``table`` per dataset, the best model in bold; the runs it leaves
    out (``runs``: every run found) named in its caption."""
    parts = ["% Generated by `skinclf report`; needs \\usepackage{booktabs}."]
    # What no table shows, for the reader of the .tex file.
    parts += [f"% {unknown}"] if (unknown := _unknown_dataset_note(runs)) else []
    parts += [
        f"% {describe_dataset(data)}: no finished run. {_left_out_note(runs, data)}"
        for data in _datasets_without_table(runs, groups)
    ]
    for data, data_groups in groups.items():
        parts += [
            "\\begin{table}[t]",
            "\\centering\\small",
            "\\begin{tabular}{l" + "r" * (len(HEADERS) - 1) + "}",
            "\\toprule",
            " & ".join(_tex_escape(h) for h in HEADERS) + " \\\\",
            "\\midrule",
        ]
        for cells, best in _display_rows(table[table["data"] == data]):
            cells = [_tex_escape(c) for c in cells]
            parts.append(" & ".join(f"\\textbf{{{c}}}" if best else c for c in cells) + " \\\\")
        caption = " ".join(
            text
            for text in (
                f"Validation and training accuracies, {describe_dataset(data)}.",
                _dataset_note(data_groups),
                _footnote(),
                _left_out_note(runs, data),
            )
            if text
        )
        parts += [
            "\\bottomrule",
            "\\end{tabular}",
            f"\\caption{{{_tex_escape(caption)}}}",
            "\\end{table}",
            "",
        ]
    return "\n".join(parts)


def finished(runs: list[Run]) -> list[Run]:
    """The runs that Table 1 and the figures use."""
    return [run for run in runs if run.status == FINISHED]
