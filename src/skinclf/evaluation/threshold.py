"""The operating point: the decision threshold chosen on validation for a target sensitivity."""

from __future__ import annotations

import numpy as np

from skinclf.evaluation.metrics import DEFAULT_THRESHOLD


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (MEL recall) on these labels reaches ``target``.

    Missing a melanoma costs more than a false alarm (paper section 4), so the threshold is the
    highest at which at least ``target`` of the MEL images are flagged (the k-th highest MEL
    probability: below 0.5 for a model that misses melanomas at 0.5, above it for one that is
    sure of them); the highest such threshold keeps specificity as high as possible.
    """
    labels = np.asarray(labels).astype(int)
    mel_probs = np.sort(np.asarray(probs)[labels == 1])[::-1]
    if len(mel_probs) == 0:
        return DEFAULT_THRESHOLD
    # Flagging the k highest-scoring MEL images needs threshold <= their k-th probability.
    k = int(np.ceil(target * len(mel_probs) - 1e-9))
    # That probability is compared three ways: as the float32 it is (the run's metrics), as its
    # exact value in float64 (predict and explain, from .tolist()) and as predictions.csv writes
    # it, the shortest decimal that reads back as the same float32, read as float64 (0.4827949
    # for 0.4827949106693268, 0.7 for 0.699999988079071). The lower of the last two is a
    # threshold that this image reaches in all three, and no image below it does.
    value = mel_probs[max(k, 1) - 1]
    return min(float(value), float(str(value)))
