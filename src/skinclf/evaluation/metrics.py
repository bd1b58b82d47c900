"""Binary classification metrics with MEL as the positive class."""

from __future__ import annotations

import numpy as np

# A MEL probability at or above this calls MEL: training and validation accuracy, test metrics at
# the default threshold, predictions of a run with no operating point.
DEFAULT_THRESHOLD = 0.5


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Accuracy, F1, sensitivity, specificity, ROC AUC and the confusion counts at ``threshold``."""
    # Imported here: sklearn takes about a second to import, which `skinclf train` need not pay
    # before its first evaluation (nor its --help or a refused setting).
    from sklearn.metrics import confusion_matrix, roc_auc_score

    labels = np.asarray(labels).astype(int)
    preds = (np.asarray(probs) >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, preds, labels=[0, 1]).ravel())
    confusion = {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    both_classes = len(np.unique(labels)) == 2
    return {
        **scores_from_confusion(confusion),
        "roc_auc": float(roc_auc_score(labels, probs)) if both_classes else float("nan"),
        "confusion": confusion,
    }


def scores_from_confusion(confusion: dict[str, int]) -> dict[str, float]:
    """Accuracy, F1, sensitivity and specificity from the confusion counts (tn, fp, fn, tp); F1 as
    sklearn's f1_score with zero_division=0 gives it, to the last bit. `skinclf report` checks a
    run's stored scores against its stored counts with this."""
    tn, fp, fn, tp = (confusion[cell] for cell in ("tn", "fp", "fn", "tp"))
    return {
        "accuracy": (tp + tn) / max(tn + fp + fn + tp, 1),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
    }
