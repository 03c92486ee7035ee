"""Metrics agree with a hand computation; the threshold is the F1 maximiser on the given rows."""

import numpy as np
import pytest

from safety_classifier.calibration import f1_maximising_threshold
from safety_classifier.metrics import METRIC_KEYS, classification_metrics, format_metrics_table


def test_metrics_match_a_hand_computation():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.05])
    metrics = classification_metrics(labels, scores, threshold=0.5)
    # predictions at 0.5: [0,0,0,1,1,1,0,0] -> TP=2, FP=1, FN=1, TN=4
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    # ROC-AUC: of the 3x5 positive/negative pairs, the positive outranks the negative in 11.
    assert metrics["roc_auc"] == pytest.approx(11 / 15)
    # AUPRC (average precision): ranks 0.9(+) 0.8(-) 0.7(+) 0.4 0.35 0.2(+) -> (1 + 2/3 + 3/6) / 3
    assert metrics["auprc"] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    assert metrics["n"] == 8 and metrics["threshold"] == 0.5
    assert set(metrics) == set(METRIC_KEYS)


def test_threshold_maximises_f1_over_every_candidate():
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.15).astype(int)
    scores = np.clip(labels * 0.3 + rng.random(300) * 0.8, 0, 1)
    chosen = f1_maximising_threshold(labels, scores)
    best = max(classification_metrics(labels, scores, t)["f1"] for t in np.unique(scores))
    assert classification_metrics(labels, scores, chosen)["f1"] == pytest.approx(best)


def test_ranking_metrics_are_none_with_one_class():
    metrics = classification_metrics(np.zeros(5, int), np.linspace(0, 1, 5), 0.5)
    assert metrics["roc_auc"] is None and metrics["auprc"] is None
    assert "n/a" in format_metrics_table({"x": metrics})


def test_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        f1_maximising_threshold(np.ones(4, int), np.linspace(0, 1, 4))
