"""Classification metrics (scikit-learn) and calibration metrics of scores at a decision threshold, and their table."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .calibration import brier_score, expected_calibration_error

METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "roc_auc", "auprc", "ece", "brier", "threshold", "n")


def ranking_metric(metric, labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC and AUPRC are undefined with one class present: None rather than a warning and NaN."""
    if labels.min() == labels.max():
        return None
    value = float(metric(labels, scores))
    return None if math.isnan(value) else value


def classification_metrics(labels: np.ndarray, unsafe_probabilities: np.ndarray, threshold: float,
                           predicted: np.ndarray | None = None) -> dict:
    """accuracy, precision, recall, F1 (unsafe = positive class) at `threshold`, ROC-AUC and AUPRC, and
    how well the scores are calibrated: ECE (15 equal-width bins) and Brier score. `predicted`: the
    verdicts where they are more than P(unsafe) >= threshold (a category route,
    `categories.unsafe_verdicts`); the ranking and calibration figures are P(unsafe)'s either way."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(unsafe_probabilities, dtype=np.float64)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    if len(labels) == 0:
        raise ValueError("no rows to compute metrics on")
    predictions = (scores >= threshold if predicted is None else np.asarray(predicted, dtype=bool)).astype(np.int64)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} verdicts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_division is handled explicitly below
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predictions, average="binary", pos_label=1, zero_division=0.0
        )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": ranking_metric(roc_auc_score, labels, scores),
        "auprc": ranking_metric(average_precision_score, labels, scores),
        "ece": expected_calibration_error(labels, scores),
        "brier": brier_score(labels, scores),
        "threshold": float(threshold),
        "n": int(len(labels)),
    }


def format_metrics_table(metrics_by_split: dict[str, dict]) -> str:
    """A fixed-width table, one row per split."""
    columns = METRIC_KEYS
    header = f"{'split':<12}" + "".join(f"{column:>11}" for column in columns)
    lines = [header, "-" * len(header)]
    for split, metrics in metrics_by_split.items():
        cells = []
        for column in columns:
            value = metrics.get(column)
            if value is None:
                cells.append(f"{'n/a':>11}")
            elif column == "n":
                cells.append(f"{value:>11d}")
            else:
                cells.append(f"{value:>11.4f}")
        lines.append(f"{split:<12}" + "".join(cells))
    return "\n".join(lines)
