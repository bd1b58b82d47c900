"""The operating point: the decision threshold chosen on validation for a target sensitivity."""

from __future__ import annotations

import numpy as np


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
        return 0.5
    # Flagging the k highest-scoring MEL images needs threshold <= their k-th probability.
    k = int(np.ceil(target * len(mel_probs) - 1e-9))
    # That probability as predictions.csv writes it: the shortest decimal that reads back as the
    # same value in its own dtype. Compared with that file's values read as float64, or with
    # the float32 probabilities in memory, it flags the same images; the float32's exact value
    # in float64 (0.4827949106693268 for a prob_mel written 0.4827949) would miss that image.
    return float(str(mel_probs[max(k, 1) - 1]))
