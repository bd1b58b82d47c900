"""The report's figures: training curves (paper Figure 2), the confusion matrix (Table 2) and ROC.

The curves and the ROC have a ``*_data`` function returning exactly what is drawn, so that tests
(and users) can check the numbers behind a plot; the confusion matrix draws Table 2's own numbers.
Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no display or GUI
backend is ever involved, and nothing global is left open.
One row (or panel) per dataset: runs on different datasets never share an axis.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from skinclf.report.groups import Group
from skinclf.report.runs import describe_dataset
from skinclf.report.tables import CLASSES

SMOOTHING_EPOCHS = 5  # the paper's rolling window
PAPER_WIDTH = 7.0  # inches: a two-column paper's text width, so 8 pt text stays 8 pt in print
PAPER_STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.2,
}
LEGEND_WIDTH = 45  # characters per legend line
TITLE_WIDTH = 60  # characters per line of a title across a figure's two panels
ROC_GRID = np.linspace(0.0, 1.0, 201)  # false-positive rates at which seeds' ROC curves are averaged


@dataclass
class CurveData:
    """What curves.png draws for one group: smoothed accuracies (%) and the best-epoch marker."""

    label: str
    epochs: np.ndarray
    val: np.ndarray
    train: np.ndarray
    best_epoch: int
    best_val: float  # the smoothed validation curve at best_epoch: where the red circle sits
    best_train: float


def curve_data(group: Group) -> CurveData:
    """Per-epoch validation and training accuracy (%) of a group, averaged over its runs (each
    epoch over the runs that reached it), smoothed over a trailing rolling window of
    ``SMOOTHING_EPOCHS``. The best epoch is where the unsmoothed (seed-mean) validation accuracy
    peaks first: for one run, the epoch of its best checkpoint."""
    history = pd.concat([run.history[["epoch", "val_acc", "train_acc"]] for run in group.runs])
    raw = 100 * history.groupby("epoch").mean().sort_index()
    smooth = raw.rolling(SMOOTHING_EPOCHS, min_periods=1).mean()
    best_epoch = int(raw["val_acc"].idxmax())
    return CurveData(
        label=group.label,
        epochs=raw.index.to_numpy(),
        val=smooth["val_acc"].to_numpy(),
        train=smooth["train_acc"].to_numpy(),
        best_epoch=best_epoch,
        best_val=float(smooth.loc[best_epoch, "val_acc"]),
        best_train=float(smooth.loc[best_epoch, "train_acc"]),
    )


def _title(*lines: str) -> str:
    """A panel's title, each line wrapped at LEGEND_WIDTH: a long model label (its variant's
    settings) or dataset name would otherwise run past the figure's edge and be cut off."""
    return "\n".join(textwrap.fill(line, LEGEND_WIDTH) for line in lines)


def _wrap(label: str) -> str:
    """Legend entries of runs with long differing settings on several lines, not one wide one."""
    return textwrap.fill(label, LEGEND_WIDTH, subsequent_indent="  ")


def _colors(groups: dict[str, list[Group]]) -> dict[str, tuple]:
    """One colour per model label, the same in every panel and figure."""
    labels = list(dict.fromkeys(g.label for data_groups in groups.values() for g in data_groups))
    cmap = mpl.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


@mpl.rc_context(PAPER_STYLE)
def curves_figure(groups: dict[str, list[Group]]) -> Figure:
    """Paper Figure 2: (a) validation and (b) training accuracy per epoch, one row per dataset."""
    colors = _colors(groups)
    fig = Figure(figsize=(PAPER_WIDTH, 2.8 * len(groups)), layout="constrained")
    # One subfigure per dataset, titled with it, so no axis is shared across datasets.
    for subfig, (data, data_groups) in zip(
        fig.subfigures(len(groups), 1, squeeze=False)[:, 0], groups.items(), strict=True
    ):
        # Wrapped: a dataset named with its settings ran off both edges, "synthetic" with it.
        title = textwrap.fill(f"{describe_dataset(data)}; rolling {SMOOTHING_EPOCHS}-epoch mean", TITLE_WIDTH)
        subfig.suptitle(title, fontsize=8)
        val_ax, train_ax = subfig.subplots(1, 2)
        for group in data_groups:
            curve = curve_data(group)
            for ax, values, best in (
                (val_ax, curve.val, curve.best_val),
                (train_ax, curve.train, curve.best_train),
            ):
                ax.plot(curve.epochs, values, color=colors[curve.label], label=curve.label)
                ax.plot(curve.best_epoch, best, "o", ms=7, mfc="none", mec="red", mew=1.5, zorder=3)
        for ax, title in ((val_ax, "(a) Validation"), (train_ax, "(b) Training")):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            # min_n_ticks=1: a dataset whose runs all stopped after epoch 1 got ticks 0.945 ... 1.05.
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, label=_wrap(label)) for label, c in colors.items()]
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="red", label="best validation epoch"))
    fig.legend(handles=handles, loc="outside right upper")
    return fig


@mpl.rc_context(PAPER_STYLE)
def confusion_figure(confusion: pd.DataFrame) -> Figure:
    """Paper Table 2 as an image: counts (rows true, columns predicted) and the scores beside them."""
    datasets = list(dict.fromkeys(confusion["data"]))
    fig = Figure(figsize=(PAPER_WIDTH * 0.75, 2.4 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, data in zip(axes, datasets, strict=True):
        rows = confusion[confusion["data"] == data].set_index("true").loc[list(CLASSES)]
        counts = rows[["pred_NEV", "pred_MEL"]].to_numpy()
        ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
        for (i, j), count in np.ndenumerate(counts):
            dark = count > counts.max() / 2
            ax.text(
                j, i, f"{count:d}", ha="center", va="center", fontsize=10, color="white" if dark else "black"
            )
        ax.set_xticks([0, 1], [f"Pred {c}" for c in CLASSES])
        ax.set_yticks([0, 1], list(CLASSES))
        ax.set_ylabel("true class")
        first = rows.iloc[0]
        # One run of the row: with several seeds, the best on validation, not the mean of Table 1.
        which = ""
        if first["of_runs"] > 1:
            seed = "" if pd.isna(first["seed"]) else f"seed {int(first['seed'])}: "
            which = f" ({seed}best validation of {first['of_runs']} runs)"
        ax.set_title(_title(f"{first['model']}, test set{which}", describe_dataset(data)))
        scores = "\n".join(
            f"{name:<12}{first[key]:.4f}"
            for name, key in (
                ("accuracy", "accuracy"),
                ("F1", "f1"),
                ("sensitivity", "sensitivity"),
                ("specificity", "specificity"),
                ("ROC AUC", "roc_auc"),
            )
        )
        ax.text(1.08, 0.5, scores, transform=ax.transAxes, va="center", family="monospace")
    return fig


@dataclass
class RocData:
    """What roc.png draws for one group: the test ROC curve and the AUC in its legend."""

    label: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc_mean: float
    auc_std: float
    n: int


def roc_data(group: Group) -> RocData | None:
    """The test ROC of a group from its runs' predictions.csv; None when no run has test predictions.

    One run: its exact curve. Several: the mean true-positive rate over the runs at fixed false-
    positive rates (vertical averaging). The AUC is the runs' own ``roc_auc``, as in Table 1.
    """
    # Imported here: sklearn takes about a second, which `skinclf report --help` and its errors
    # need not pay.
    from sklearn.metrics import roc_curve

    curves, aucs = [], []
    for run in group.runs:
        # A run whose predictions.csv is damaged was named on stderr and in runs.csv instead.
        predictions = run.test_predictions() if run.tested and not run.predictions_problem else None
        if predictions is None or predictions["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(predictions["label"], predictions["prob_mel"])
        curves.append((fpr, tpr))
        aucs.append(float(run.test["roc_auc"]))
    if not curves:
        return None
    if len(curves) == 1:
        fpr, tpr = curves[0]
    else:
        fpr = ROC_GRID
        tpr = np.mean([np.interp(fpr, f, t) for f, t in curves], axis=0)
        tpr[0] = 0.0
    std = float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan")
    return RocData(group.label, fpr, tpr, float(np.mean(aucs)), std, len(aucs))


@mpl.rc_context(PAPER_STYLE)
def roc_figure(groups: dict[str, list[Group]]) -> Figure | None:
    """Test ROC curves of every model, one panel per dataset, AUC in the legend; None without data."""
    colors = _colors(groups)
    curves = {
        data: [c for c in map(roc_data, data_groups) if c is not None] for data, data_groups in groups.items()
    }
    curves = {data: c for data, c in curves.items() if c}
    if not curves:
        return None
    legend_lines = max(
        sum(_wrap(c.label).count("\n") + 1 for c in data_curves) for data_curves in curves.values()
    )
    title_lines = max(_roc_title(data).count("\n") + 1 for data in curves)
    # A square panel, its title above and its legend below: a long dataset name's title lines
    # took the legend's room, and its last entries were cut off at the bottom.
    height = PAPER_WIDTH / 2 + 0.3 + 0.16 * (legend_lines + title_lines)
    fig = Figure(figsize=(PAPER_WIDTH / 2 * len(curves), height), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (data, data_curves) in zip(axes, curves.items(), strict=True):
        for c in data_curves:
            auc = f"{c.auc_mean:.3f}" + (f" ± {c.auc_std:.3f}, n={c.n}" if c.n > 1 else "")
            ax.plot(c.fpr, c.tpr, color=colors[c.label], label=_wrap(f"{c.label} (AUC {auc})"))
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.set_xlabel("false-positive rate (1 - specificity)")
        ax.set_ylabel("true-positive rate (sensitivity)")
        ax.set_title(_roc_title(data))
        # Below the panel: a legend inside would hide the curves' upper-left corner.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18))
        ax.grid(alpha=0.3)
    return fig


def _roc_title(data: str) -> str:
    return _title("Test ROC", describe_dataset(data))
