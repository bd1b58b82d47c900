"""The operating point: a threshold chosen on validation for a target sensitivity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinclf.evaluation.metrics import binary_metrics
from skinclf.evaluation.threshold import threshold_for_sensitivity

from conftest import TINY, train_in_process


def _sensitivity(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    return float((probs[labels == 1] >= threshold).mean())


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_threshold_reaches_the_target_and_is_the_highest_that_does(target, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Overlapping scores, with ties, as a real classifier's probabilities.
    probs = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)

    threshold = threshold_for_sensitivity(labels, probs, target)
    assert _sensitivity(labels, probs, threshold) >= target
    # Any higher threshold (the next distinct MEL score up) misses the target: specificity is not
    # given away for nothing.
    higher = probs[(labels == 1) & (probs > threshold)]
    if len(higher):
        assert _sensitivity(labels, probs, higher.min()) < target
    assert binary_metrics(labels, probs, threshold)["sensitivity"] == _sensitivity(labels, probs, threshold)


def test_without_mel_images_the_threshold_is_the_default():
    assert threshold_for_sensitivity(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.9]), 0.95) == 0.5


def test_a_tiny_run_stores_a_threshold_that_reaches_the_target_on_validation(tmp_path, shared_data_dir):
    target = 0.9
    run_dir, metrics = train_in_process(
        tmp_path, *TINY, f"data.cache_dir={shared_data_dir}", f"eval.target_sensitivity={target}"
    )
    point = metrics["operating_point"]
    assert point["target_sensitivity"] == target
    predictions = pd.read_csv(run_dir / "predictions.csv")
    val = predictions[predictions["split"] == "val"]
    test = predictions[predictions["split"] == "test"]
    # predictions.csv holds float32 probabilities in their shortest decimal form: compare in float32.
    val_probs, threshold = val["prob_mel"].to_numpy(np.float32), np.float32(point["threshold"])
    assert _sensitivity(val["label"].to_numpy(), val_probs, threshold) >= target

    # The test figures at the operating point and at 0.5 are those of the stored predictions.
    at_point = binary_metrics(test["label"], test["prob_mel"], point["threshold"])
    assert point["test_sensitivity"] == pytest.approx(at_point["sensitivity"])
    assert point["test_specificity"] == pytest.approx(at_point["specificity"])
    assert metrics["sensitivity"] == pytest.approx(
        binary_metrics(test["label"], test["prob_mel"])["sensitivity"]
    )
    assert (run_dir / "roc.png").stat().st_size > 0 and (run_dir / "pr.png").stat().st_size > 0


def test_binary_metrics_match_a_hand_count():
    # At 0.5: NV .1 .2 correct, NV .6 .7 false alarms; MEL .8 found, MEL .4 missed. fp != fn and
    # tp != tn, so swapped cells in any formula show.
    metrics = binary_metrics(np.array([0, 0, 0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.2, 0.8, 0.4]))
    assert metrics["confusion"] == {"tn": 2, "fp": 2, "fn": 1, "tp": 1}
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["sensitivity"] == pytest.approx(1 / 2)
    assert metrics["specificity"] == pytest.approx(2 / 4)
    assert metrics["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))
    # AUC: of the 8 (MEL, NV) pairs the MEL scores higher in 6 (.4 loses to .6 and .7).
    assert metrics["roc_auc"] == pytest.approx(6 / 8)
