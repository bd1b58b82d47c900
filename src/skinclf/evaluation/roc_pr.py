"""Per-run ROC and precision-recall figures (validation and test), from predictions.csv."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from skinclf.evaluation.metrics import binary_metrics
from skinclf.io import save_figure
from skinclf.run_files import PR_FIGURE, ROC_FIGURE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# matplotlib and sklearn are imported where a figure is drawn: together they take 1.6 s to
# import, which every `skinclf train` (its --help and its error messages included) would pay.
# Figures use the object-oriented Figure API, not pyplot: no GUI backend or global figure
# state, so they draw on headless machines and never change the backend of a notebook.

SPLIT_STYLES = {"val": ("validation", "tab:blue"), "test": ("test", "tab:orange")}


def _scored_splits(predictions: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(split, labels, probabilities) for each split that has both classes (a curve needs both)."""
    out = []
    for split in SPLIT_STYLES:
        rows = predictions[predictions["split"] == split]
        labels = rows["label"].to_numpy().astype(int)
        if len(np.unique(labels)) == 2:
            out.append((split, labels, rows["prob_mel"].to_numpy()))
    return out


def plot_roc(predictions: pd.DataFrame, threshold: float | None = None, title: str = "") -> Figure:
    """ROC curves of the validation and test splits, AUC in the legend; the operating point
    (``threshold``) marked on each curve."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.subplots()
    for split, labels, probs in _scored_splits(predictions):
        name, colour = SPLIT_STYLES[split]
        fpr, tpr, _ = roc_curve(labels, probs)
        auc = roc_auc_score(labels, probs)
        ax.plot(fpr, tpr, color=colour, label=f"{name} (AUC {auc:.3f}, n={len(labels)})")
        if threshold is not None:
            point = operating_point(labels, probs, threshold)
            _mark_operating_point(ax, point["false_positive_rate"], point["sensitivity"], colour)
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1, label="chance")
    _label_operating_point(ax, threshold)
    roc_title = title or "ROC, MEL positive"
    _finish(ax, "1 - specificity (NV called MEL)", "sensitivity (MEL found)", roc_title, "lower right")
    return fig


def plot_pr(predictions: pd.DataFrame, threshold: float | None = None, title: str = "") -> Figure:
    """Precision-recall curves of the validation and test splits, average precision in the legend;
    the operating point (``threshold``) marked on each curve that has MEL calls there."""
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.subplots()
    for split, labels, probs in _scored_splits(predictions):
        name, colour = SPLIT_STYLES[split]
        precision, recall, _ = precision_recall_curve(labels, probs)
        ap = average_precision_score(labels, probs)
        ax.plot(
            recall,
            precision,
            color=colour,
            drawstyle="steps-post",
            label=f"{name} (AP {ap:.3f}, n={len(labels)})",
        )
        # A classifier with no skill sits at the MEL prevalence.
        ax.axhline(labels.mean(), color=colour, linestyle=":", linewidth=1)
        if threshold is not None:
            point = operating_point(labels, probs, threshold)
            if point["flagged"]:  # precision is undefined where nothing is called MEL
                _mark_operating_point(ax, point["sensitivity"], point["precision"], colour)
    ax.plot([], [], ":", color="grey", linewidth=1, label="no skill (MEL prevalence)")
    _label_operating_point(ax, threshold)
    pr_title = title or "Precision-recall, MEL positive"
    _finish(ax, "recall = sensitivity", "precision (MEL calls that are MEL)", pr_title, "lower left")
    return fig


def operating_point(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Where calling MEL at ``probs >= threshold`` lands: sensitivity (= recall), false-positive
    rate (1 - specificity), precision (nan when nothing is called MEL) and the number called."""
    metrics = binary_metrics(labels, probs, threshold)
    tp, fp = metrics["confusion"]["tp"], metrics["confusion"]["fp"]
    return {
        "sensitivity": metrics["sensitivity"],
        "false_positive_rate": 1 - metrics["specificity"],
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "flagged": tp + fp,
    }


def _mark_operating_point(ax: Axes, x: float, y: float, colour: str) -> None:
    ax.plot(x, y, "o", color=colour, markerfacecolor="none", markersize=8)


def _label_operating_point(ax: Axes, threshold: float | None) -> None:
    """One legend entry for the circles of every split."""
    if threshold is not None:
        ax.plot(
            [], [], "o", color="black", markerfacecolor="none", label=f"operating point p>={threshold:.3g}"
        )


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """The frame both curves share: unit axes, title, legend, light grid."""
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title, fontsize=10)
    ax.legend(loc=legend_loc, fontsize=8)
    ax.grid(alpha=0.3)


def write_run_curves(
    predictions: pd.DataFrame, out_dir: Path, threshold: float | None = None, title: str = ""
) -> list[Path]:
    """Write roc.png and pr.png into ``out_dir`` from a predictions table (split,label,prob_mel)."""
    paths = [Path(out_dir) / ROC_FIGURE, Path(out_dir) / PR_FIGURE]
    save_figure(plot_roc(predictions, threshold, title and f"ROC: {title}"), paths[0])
    save_figure(plot_pr(predictions, threshold, title and f"Precision-recall: {title}"), paths[1])
    return paths
