"""Calibrated P(unsafe), calibration metrics, and decision thresholds chosen on validation.

The classifier's raw score is the logit margin z = logit(unsafe) - logit(safe); softmax[:, 1]
is sigmoid(z). Training with class-weighted cross-entropy shifts z by about
log(w_unsafe / w_safe) and a high head learning rate stretches it, so sigmoid(z) over-states
P(unsafe). Platt scaling, p = sigmoid(scale * z + bias), fitted by log-loss on the validation
split, undoes both: `bias` removes the shift, `scale` the stretch. Temperature scaling is the
special case bias = 0 and cannot remove the shift. A classifier without a stored calibration
(saved before calibration existed) uses the identity, scale 1 and bias 0: sigmoid(z), as before.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import expit, log_expit
from sklearn.metrics import precision_recall_curve

from .errors import ModelLoadError, ThresholdTargetError

CALIBRATION_METHODS = ("platt", "temperature", "none")
ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(scale * margin + bias); the identity (scale 1, bias 0) is softmax[:, 1]."""

    method: str = "none"
    scale: float = 1.0
    bias: float = 0.0

    def probabilities(self, margins: ArrayLike) -> np.ndarray:
        """Calibrated P(unsafe) per logit margin; a margin of -inf (empty prompt) stays 0.0."""
        margins = np.asarray(margins, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            probabilities = expit(self.scale * margins + self.bias)
        return np.where(np.isneginf(margins), 0.0, probabilities)

    def to_metadata(self) -> dict:
        return {"method": self.method, "scale": float(self.scale), "bias": float(self.bias)}

    @classmethod
    def from_metadata(cls, metadata: dict) -> Calibration:
        """The calibration stored in `safety_classifier.json`; none stored (older directories) = identity."""
        stored = metadata.get("calibration")
        if stored is None:
            return IDENTITY
        try:
            calibration = cls(str(stored["method"]), float(stored["scale"]), float(stored["bias"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ModelLoadError(f"unreadable calibration {stored!r} in the classifier's metadata ({error})") from None
        if not (math.isfinite(calibration.scale) and calibration.scale > 0 and math.isfinite(calibration.bias)):
            raise ModelLoadError(f"calibration {stored!r}: scale must be finite and positive, bias finite")
        return calibration

    def describe(self) -> str:
        if self.method == "none":
            return "none: P(unsafe) = sigmoid(margin) = softmax[:, 1]"
        return f"{self.method}: P(unsafe) = sigmoid({self.scale:.4g} * margin {self.bias:+.4g})"


IDENTITY = Calibration()


def fit_calibration(margins: ArrayLike, labels: ArrayLike, method: str = "platt") -> Calibration:
    """Fit `method` (platt: scale and bias; temperature: scale only; none: identity) by log-loss.

    The targets are Platt's (1999): (n_unsafe + 1) / (n_unsafe + 2) for unsafe rows and
    1 / (n_safe + 2) for safe ones, so that a perfectly separated validation split (common with a
    few hundred rows) still gives a finite fit. Unweighted rows: the result is calibrated to the
    validation split's base rate, which the stratified split shares with the training data.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if method == "none":
        return IDENTITY
    margins = np.asarray(margins, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    finite = np.isfinite(margins)
    margins, labels = margins[finite], labels[finite]
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if positives == 0 or negatives == 0:
        raise ValueError("fitting a calibration needs both classes in the labels")
    targets = np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    # Standardise the margins so that Newton's method starts well conditioned whatever their range.
    spread = float(margins.std()) or 1.0
    centre = float(margins.mean()) if method == "platt" else 0.0
    scale, bias = _newton_logistic((margins - centre) / spread, targets, fit_bias=method == "platt")
    scale, bias = scale / spread, bias - scale * centre / spread
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(bias)):
        # A non-increasing map would rank safe above unsafe: the validation scores carry no usable
        # ranking, so keep the raw scores rather than invert them.
        warnings.warn(f"{method} calibration gave a slope of {scale:.3g} on validation; no calibration applied",
                      stacklevel=2)
        return IDENTITY
    return Calibration(method, scale, bias)


def _log_loss(x: np.ndarray, targets: np.ndarray, a: float, b: float) -> float:
    u = a * x + b
    return float(-np.mean(targets * log_expit(u) + (1 - targets) * log_expit(-u)))


def _newton_logistic(x: np.ndarray, targets: np.ndarray, fit_bias: bool, iterations: int = 100) -> tuple[float, float]:
    """argmin over (a, b) of the mean cross-entropy of sigmoid(a x + b) against `targets` (b = 0 if not fit_bias).

    Two parameters and a convex loss: damped Newton converges in a few steps, exactly and
    deterministically.
    """
    a, b = 1.0, 0.0
    loss = _log_loss(x, targets, a, b)
    for _ in range(iterations):
        p = expit(a * x + b)
        residual, weight = p - targets, p * (1 - p)
        gradient = np.array([np.mean(residual * x), np.mean(residual)])
        hessian = np.array([[np.mean(weight * x * x), np.mean(weight * x)], [np.mean(weight * x), np.mean(weight)]])
        if not fit_bias:
            gradient, hessian = gradient[:1], hessian[:1, :1]
        step = np.linalg.solve(hessian + 1e-12 * np.eye(len(gradient)), gradient)
        size = 1.0
        while size >= 1e-10:  # backtracking: only steps that lower the loss are taken
            a_new, b_new = a - size * step[0], (b - size * step[1]) if fit_bias else 0.0
            new_loss = _log_loss(x, targets, a_new, b_new)
            if new_loss <= loss:
                break
            size /= 2
        else:
            break  # no descent left: at the minimum up to rounding
        converged = loss - new_loss < 1e-15 or np.abs(gradient).max() < 1e-12
        a, b, loss = a_new, b_new, new_loss
        if converged:
            break
    return float(a), float(b)


def expected_calibration_error(labels: ArrayLike, probabilities: ArrayLike, bins: int = ECE_BINS) -> float:
    """ECE of P(unsafe): sum over `bins` equal-width bins of (rows in bin / rows) x |share unsafe - mean P|.

    Bin k holds k/bins <= p < (k+1)/bins; p = 1 goes to the last bin.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(labels) == 0:
        raise ValueError("no rows to compute a calibration error on")
    index = np.minimum((probabilities * bins).astype(np.int64), bins - 1)
    gap = np.bincount(index, weights=labels - probabilities, minlength=bins)
    return float(np.abs(gap).sum() / len(labels))


def brier_score(labels: ArrayLike, probabilities: ArrayLike) -> float:
    """Mean squared difference between P(unsafe) and the 0/1 label."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return float(np.mean((probabilities - labels) ** 2))


def reliability_curve(labels: ArrayLike, probabilities: ArrayLike, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per non-empty bin (the ECE's bins): mean P(unsafe), share of unsafe rows and row count."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    index = np.minimum((probabilities * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    used = counts > 0
    return {
        "mean_probability": np.bincount(index, weights=probabilities, minlength=bins)[used] / counts[used],
        "fraction_unsafe": np.bincount(index, weights=labels, minlength=bins)[used] / counts[used],
        "count": counts[used],
    }


def bootstrap_f1_interval(labels: ArrayLike, probabilities: ArrayLike, threshold: float, *,
                          resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = 0.95,
                          seed: int = 0, predicted: ArrayLike | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of F1 at a fixed threshold (rows resampled with replacement);
    `predicted`: the verdicts, where they are more than `probabilities >= threshold`.

    The threshold is held fixed, so this is the sampling noise of the F1 figure itself; the noise
    of choosing the threshold on the same rows comes on top.
    """
    labels = np.asarray(labels, dtype=bool)
    predicted = (np.asarray(probabilities, dtype=np.float64) >= threshold if predicted is None
                 else np.asarray(predicted, dtype=bool))
    rows = np.random.default_rng(seed).integers(0, len(labels), size=(resamples, len(labels)))
    true_positive = (predicted & labels)[rows].sum(axis=1)
    false_positive = (predicted & ~labels)[rows].sum(axis=1)
    false_negative = (~predicted & labels)[rows].sum(axis=1)
    denominator = 2 * true_positive + false_positive + false_negative
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(resamples), where=denominator > 0)
    return percentile_interval(f1, confidence)


def percentile_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` share of bootstrap values: (low, high) percentiles."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _operating_points(labels: ArrayLike, probabilities: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at every distinct score, predicting unsafe when p >= threshold."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError("choosing a threshold needs both classes in the labels")
    precision, recall, thresholds = precision_recall_curve(labels, probabilities)
    return precision[:-1], recall[:-1], thresholds  # the last pair (recall 0) has no threshold


def f1_maximising_threshold(labels: ArrayLike, unsafe_probabilities: ArrayLike) -> float:
    """The probability cut-off (predict unsafe when p >= t) with the highest F1 on these rows.

    Picked on the validation split only; the test split is scored with it, never tuned on.
    """
    precision, recall, thresholds = _operating_points(labels, unsafe_probabilities)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(thresholds[int(np.argmax(f1))])


def check_target(name: str, target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ThresholdTargetError(f"--threshold-for-{name} must be in (0, 1], got {target}")


def threshold_for_precision(labels: ArrayLike, probabilities: ArrayLike, target: float) -> float:
    """The threshold whose precision on these rows is >= target with the highest recall (then precision)."""
    check_target("precision", target)
    precision, recall, thresholds = _operating_points(labels, probabilities)
    reaching = np.flatnonzero(precision >= target)
    if len(reaching) == 0:
        best = int(np.argmax(precision))
        raise ThresholdTargetError(
            f"no threshold reaches precision {target} on validation: the highest is {precision[best]:.4f} "
            f"(recall {recall[best]:.4f}); ask for less"
        )
    best = reaching[np.lexsort((precision[reaching], recall[reaching]))[-1]]
    return float(thresholds[best])


def threshold_for_recall(labels: ArrayLike, probabilities: ArrayLike, target: float) -> float:
    """The threshold whose recall on these rows is >= target with the highest precision (then recall)."""
    check_target("recall", target)
    precision, recall, thresholds = _operating_points(labels, probabilities)
    reaching = np.flatnonzero(recall >= target)  # never empty: the lowest threshold has recall 1
    best = reaching[np.lexsort((recall[reaching], precision[reaching]))[-1]]
    return float(thresholds[best])


def check_threshold_targets(target_precision: float | None, target_recall: float | None) -> None:
    """Refuse impossible requests before any training time is spent."""
    if target_precision is not None and target_recall is not None:
        raise ThresholdTargetError("give --threshold-for-precision or --threshold-for-recall, not both")
    if target_precision is not None:
        check_target("precision", target_precision)
    if target_recall is not None:
        check_target("recall", target_recall)


def choose_threshold(labels: ArrayLike, probabilities: ArrayLike, *, target_precision: float | None = None,
                     target_recall: float | None = None) -> tuple[float, dict]:
    """(threshold, the rule that chose it): max F1 by default, else the target precision or recall."""
    check_threshold_targets(target_precision, target_recall)
    if target_precision is not None:
        return threshold_for_precision(labels, probabilities, target_precision), {"rule": "precision", "target": target_precision}
    if target_recall is not None:
        return threshold_for_recall(labels, probabilities, target_recall), {"rule": "recall", "target": target_recall}
    return f1_maximising_threshold(labels, probabilities), {"rule": "max_f1"}


def describe_rule(rule: dict) -> str:
    if rule["rule"] == "max_f1":
        return "max F1 on validation"
    other = "recall" if rule["rule"] == "precision" else "precision"
    return f"highest {other} at {rule['rule']} >= {rule['target']} on validation"
