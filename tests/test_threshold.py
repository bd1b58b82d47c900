"""The operating point: a threshold chosen on validation for a target sensitivity."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from skinclf.evaluation.metrics import binary_metrics
from skinclf.evaluation.roc_pr import plot_pr, plot_roc
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


@pytest.mark.parametrize("seed", range(3))
def test_the_threshold_flags_the_same_images_however_the_probabilities_are_read(seed):
    # float32 probabilities whose exact values are long decimals, as a model's are, and whose
    # shortest decimals (what predictions.csv holds, read back as float64 by pandas) lie above
    # the exact value (0.7) or below it (0.4827949): the run compares in float32, predict and
    # explain compare the exact values (.tolist()), a user the file's.
    rng = np.random.default_rng(seed)
    probs = np.concatenate([[0.7, 0.4827949106693268], rng.random(400)]).astype(np.float32)
    labels = np.concatenate([[1, 1], (rng.random(400) < probs[2:]).astype(int)])
    read_back = pd.read_csv(io.StringIO(pd.DataFrame({"prob_mel": probs}).to_csv(index=False)))
    exact = np.array(torch.from_numpy(probs).tolist())
    targets = (0.5, 0.9, 0.95, 1.0)
    for threshold in [threshold_for_sensitivity(labels, probs, t) for t in targets] + [
        threshold_for_sensitivity(np.array([1, 0]), probs[[i, 2]], 1.0) for i in (0, 1)
    ]:
        in_float32 = probs >= threshold
        assert np.array_equal(exact >= threshold, in_float32)
        assert np.array_equal(read_back["prob_mel"].to_numpy() >= threshold, in_float32)
        assert np.float32(threshold) in probs[labels == 1]  # one MEL image's own probability


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
    # As a user checks it: the file's probabilities as pandas reads them, the stored threshold.
    assert _sensitivity(val["label"].to_numpy(), val["prob_mel"].to_numpy(), point["threshold"]) >= target

    # The test figures at the operating point and at 0.5 are those of the stored predictions.
    at_point = binary_metrics(test["label"], test["prob_mel"], point["threshold"])
    assert point["test_sensitivity"] == pytest.approx(at_point["sensitivity"])
    assert point["test_specificity"] == pytest.approx(at_point["specificity"])
    assert metrics["sensitivity"] == pytest.approx(
        binary_metrics(test["label"], test["prob_mel"])["sensitivity"]
    )
    assert (run_dir / "roc.png").stat().st_size > 0 and (run_dir / "pr.png").stat().st_size > 0


def test_binary_metrics_match_a_hand_count():
    # At 0.5: NV .1 .2 .3 correct, NV .6 .7 false alarms; MEL .8 .9 found, MEL .4 missed.
    # fp != fn, tp != tn and sensitivity (2/3) != specificity (3/5), so swapped cells in any
    # formula, or the two rates swapped, show.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    metrics = binary_metrics(labels, np.array([0.1, 0.6, 0.7, 0.2, 0.3, 0.8, 0.4, 0.9]))
    assert metrics["confusion"] == {"tn": 3, "fp": 2, "fn": 1, "tp": 2}
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(3 / 5)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # AUC: of the 15 (MEL, NV) pairs the MEL scores higher in 13 (.4 loses to .6 and .7).
    assert metrics["roc_auc"] == pytest.approx(13 / 15)


def _circles(fig) -> list[tuple[float, float]]:
    """The (x, y) of each circled point on a figure's axes (the legend's sample has no data)."""
    lines = fig.axes[0].get_lines()
    return [
        (float(ln.get_xdata()[0]), float(ln.get_ydata()[0]))
        for ln in lines
        if ln.get_marker() == "o" and len(ln.get_xdata())
    ]


def test_roc_and_pr_figures_circle_the_operating_point():
    # At 0.5: MEL 0.7, 0.8, 0.9 found (sensitivity 3/4), NV 0.55 and 0.6 called MEL (false-positive
    # rate 2/4), so 3 of the 5 MEL calls are right (precision 3/5).
    table = pd.DataFrame(
        {
            "split": ["val"] * 8,
            "label": [0, 0, 0, 0, 1, 1, 1, 1],
            "prob_mel": [0.1, 0.55, 0.6, 0.2, 0.4, 0.7, 0.8, 0.9],
        }
    )
    assert _circles(plot_roc(table, 0.5)) == [(pytest.approx(0.5), pytest.approx(0.75))]
    assert _circles(plot_pr(table, 0.5)) == [(pytest.approx(0.75), pytest.approx(0.6))]
    # Above every probability nothing is called MEL: no precision, so no circle on that curve.
    assert _circles(plot_pr(table, 0.95)) == []
    assert _circles(plot_pr(table)) == [] and _circles(plot_roc(table)) == []
