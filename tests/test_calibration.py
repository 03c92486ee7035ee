"""Calibration of P(unsafe): fitting, metrics, storage, its use in every scoring path, old directories,
and thresholds chosen by target precision or recall."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fast_training_flags
from scipy.special import expit

from safety_classifier.artifacts import FORMAT_VERSION, METADATA_FILE
from safety_classifier.calibration import (
    IDENTITY,
    Calibration,
    bootstrap_f1_interval,
    brier_score,
    choose_threshold,
    expected_calibration_error,
    f1_maximising_threshold,
    fit_calibration,
    reliability_curve,
    threshold_for_precision,
    threshold_for_recall,
)
from safety_classifier.cli import infer_main, train_main
from safety_classifier.errors import ModelLoadError, ThresholdTargetError
from safety_classifier.inference import load_classifier, predict_logit_margins, predict_unsafe_probabilities
from safety_classifier.metrics import METRIC_KEYS, classification_metrics


def miscalibrated(n: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True P(unsafe) = sigmoid(z); the classifier reports the margin 3z + 2 (over-confident and shifted)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < expit(z)).astype(int)
    return z, 3 * z + 2, labels


# --- fitting ---------------------------------------------------------------------------------------

def test_platt_scaling_corrects_a_known_miscalibration():
    z, margins, labels = miscalibrated()
    calibration = fit_calibration(margins, labels, "platt")
    assert calibration.method == "platt"
    assert calibration.scale == pytest.approx(1 / 3, abs=0.01)
    assert calibration.bias == pytest.approx(-2 / 3, abs=0.03)
    raw, fixed = expit(margins), calibration.probabilities(margins)
    assert expected_calibration_error(labels, raw) > 0.1
    assert expected_calibration_error(labels, fixed) < 0.01
    assert brier_score(labels, fixed) < brier_score(labels, raw)
    np.testing.assert_allclose(fixed, expit(z), atol=0.02)


def test_temperature_scaling_cannot_remove_a_shift_that_platt_removes():
    _, margins, labels = miscalibrated()
    temperature = fit_calibration(margins, labels, "temperature")
    assert temperature.method == "temperature" and temperature.bias == 0.0 and 0 < temperature.scale < 1
    platt = fit_calibration(margins, labels, "platt")
    assert (expected_calibration_error(labels, temperature.probabilities(margins))
            > 3 * expected_calibration_error(labels, platt.probabilities(margins)))


def test_the_class_weight_shift_is_undone():
    """Class-weighted training adds about log(w_unsafe / w_safe) to the margin; Platt's bias removes it."""
    rng = np.random.default_rng(1)
    z = rng.normal(-2.5, 2.0, 50_000)  # about 15 % unsafe, as ToxicChat
    labels = (rng.random(len(z)) < expit(z)).astype(int)
    weights = len(labels) / (2 * np.bincount(labels))
    shifted = z + np.log(weights[1] / weights[0])
    calibration = fit_calibration(shifted, labels)
    assert calibration.scale == pytest.approx(1.0, abs=0.03)
    assert calibration.bias == pytest.approx(-np.log(weights[1] / weights[0]), abs=0.1)
    assert expit(shifted).mean() > labels.mean() + 0.1, "uncalibrated: far above the base rate"
    assert calibration.probabilities(shifted).mean() == pytest.approx(labels.mean(), abs=0.005)


def test_separable_validation_rows_still_give_a_finite_increasing_calibration():
    calibration = fit_calibration([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], [0, 0, 0, 1, 1, 1])
    assert np.isfinite([calibration.scale, calibration.bias]).all() and calibration.scale > 0


def test_an_inverted_ranking_is_not_calibrated_into_a_decreasing_map():
    with pytest.warns(UserWarning, match="no calibration applied"):
        assert fit_calibration([3.0, 2.0, 1.0, -1.0, -2.0, -3.0], [0, 0, 0, 1, 1, 1]) == IDENTITY


def test_calibration_none_and_bad_input():
    assert fit_calibration([1.0, 2.0], [0, 1], "none") == IDENTITY
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="unknown calibration"):
        fit_calibration([1.0, 2.0], [0, 1], "isotonic")


def test_identity_is_softmax_and_empty_prompts_stay_at_zero():
    logits = torch.tensor([[0.3, -1.2], [2.0, 2.5], [-4.0, 6.0]], dtype=torch.float64)
    margins = (logits[:, 1] - logits[:, 0]).numpy()
    np.testing.assert_allclose(IDENTITY.probabilities(margins), torch.softmax(logits, -1)[:, 1].numpy(), atol=1e-15)
    for calibration in (IDENTITY, Calibration("platt", 0.3, 2.0)):
        assert calibration.probabilities([-np.inf])[0] == 0.0


def test_calibration_round_trips_through_metadata_and_absent_means_identity():
    calibration = Calibration("platt", 0.42, -1.5)
    assert Calibration.from_metadata({"calibration": json.loads(json.dumps(calibration.to_metadata()))}) == calibration
    assert Calibration.from_metadata({}) == IDENTITY
    assert Calibration.from_metadata({"calibration": None}) == IDENTITY
    for bad in ({"method": "platt", "scale": -1.0, "bias": 0.0}, {"method": "platt"}, "platt"):
        with pytest.raises(ModelLoadError, match="calibration"):
            Calibration.from_metadata({"calibration": bad})


# --- metrics ---------------------------------------------------------------------------------------

def test_ece_and_brier_match_a_hand_computation():
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.02, 0.04, 0.5, 0.52, 1.0])
    # 15 bins of width 1/15: {0.02, 0.04} in bin 0, {0.5, 0.52} in bin 7, 1.0 in the last bin.
    # |unsafe - sum p| per bin: |1 - 0.06| = 0.94, |1 - 1.02| = 0.02, |1 - 1| = 0; over 5 rows.
    assert expected_calibration_error(labels, scores) == pytest.approx((0.94 + 0.02) / 5)
    assert brier_score(labels, scores) == pytest.approx((0.02**2 + 0.96**2 + 0.5**2 + 0.52**2 + 0) / 5)
    metrics = classification_metrics(labels, scores, 0.5)
    assert metrics["ece"] == pytest.approx(0.192) and metrics["brier"] == pytest.approx(0.28848)
    assert {"ece", "brier"} <= set(METRIC_KEYS)
    curve = reliability_curve(labels, scores)
    np.testing.assert_allclose(curve["mean_probability"], [0.03, 0.51, 1.0])
    np.testing.assert_allclose(curve["fraction_unsafe"], [0.5, 0.5, 1.0])
    assert curve["count"].tolist() == [2, 2, 1]


def test_the_bootstrap_interval_holds_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(3)
    labels = (rng.random(280) < 0.13).astype(int)
    scores = np.clip(labels * 0.35 + rng.random(280) * 0.7, 0, 1)
    threshold = f1_maximising_threshold(labels, scores)
    f1 = classification_metrics(labels, scores, threshold)["f1"]
    low, high = bootstrap_f1_interval(labels, scores, threshold, seed=42)
    assert low < f1 < high and high - low > 0.05, "280 rows: a wide interval"
    assert bootstrap_f1_interval(labels, scores, threshold, seed=42) == (low, high)
    assert bootstrap_f1_interval(labels, scores, threshold, seed=7) != (low, high)
    perfect = bootstrap_f1_interval(labels, labels.astype(float), 0.5)
    assert perfect == (1.0, 1.0)


# --- thresholds by target ----------------------------------------------------------------------------

# Predicting unsafe at p >= t:   t   0.9  0.8  0.7  0.6  0.5  0.4  0.3  0.2
#                        precision   1    1   2/3  3/4  3/5  4/6  4/7  4/8
#                           recall  1/4  2/4  2/4  3/4  3/4   1    1    1
HAND_LABELS = np.array([1, 1, 0, 1, 0, 1, 0, 0])
HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])


@pytest.mark.parametrize("target, expected", [(0.9, 0.8), (1.0, 0.8), (0.7, 0.6), (0.65, 0.4), (0.5, 0.4)])
def test_threshold_for_precision_takes_the_best_recall_reaching_the_target(target, expected):
    assert threshold_for_precision(HAND_LABELS, HAND_SCORES, target) == expected


@pytest.mark.parametrize("target, expected", [(0.95, 0.4), (1.0, 0.4), (0.7, 0.6), (0.5, 0.8), (0.2, 0.8)])
def test_threshold_for_recall_takes_the_best_precision_reaching_the_target(target, expected):
    # 0.2: thresholds 0.9 and 0.8 both have precision 1; 0.8 finds more unsafe rows.
    assert threshold_for_recall(HAND_LABELS, HAND_SCORES, target) == expected


def test_unreachable_and_invalid_targets_are_clear_errors():
    with pytest.raises(ThresholdTargetError, match=r"no threshold reaches precision 0.6.*highest is 0.5000"):
        threshold_for_precision(np.array([0, 1, 0, 1]), np.array([0.9, 0.8, 0.7, 0.6]), 0.6)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ThresholdTargetError, match="must be in"):
            threshold_for_recall(HAND_LABELS, HAND_SCORES, bad)
    with pytest.raises(ThresholdTargetError, match="not both"):
        choose_threshold(HAND_LABELS, HAND_SCORES, target_precision=0.9, target_recall=0.9)


def test_choose_threshold_records_its_rule():
    assert choose_threshold(HAND_LABELS, HAND_SCORES) == (f1_maximising_threshold(HAND_LABELS, HAND_SCORES),
                                                          {"rule": "max_f1"})
    assert choose_threshold(HAND_LABELS, HAND_SCORES, target_precision=0.9) == (0.8, {"rule": "precision", "target": 0.9})
    assert choose_threshold(HAND_LABELS, HAND_SCORES, target_recall=0.95) == (0.4, {"rule": "recall", "target": 0.95})


# --- end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated_run(tiny_phi3, toy_files, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("calibrated")
    assert train_main("full_layers", fast_training_flags(tiny_phi3, toy_files, output_dir, "--num-layers", "1")) == 0
    return output_dir


def test_training_stores_the_calibration_and_reports_it(calibrated_run):
    metadata = json.loads((calibrated_run / METADATA_FILE).read_text())
    calibration = Calibration.from_metadata(metadata)
    assert metadata["format_version"] == 2 and FORMAT_VERSION == 7  # a binary classifier stays readable by version-2 toolkits
    assert metadata["calibration"]["method"] == "platt" and calibration.scale > 0
    assert metadata["threshold_rule"] == {"rule": "max_f1"}
    metrics = json.loads((calibrated_run / "metrics.json").read_text())
    validation = metrics["validation"]
    low, high = validation["f1_interval"]
    assert low <= validation["f1"] <= high
    predictions = pd.read_csv(calibrated_run / "validation_predictions.csv")
    calibrated, raw = predictions["unsafe_probability"], predictions["uncalibrated_probability"]
    # The threshold is chosen on the calibrated scores, and the metrics describe them.
    assert validation["threshold"] == pytest.approx(f1_maximising_threshold(predictions["label"], calibrated), abs=1e-6)
    assert validation["ece"] == pytest.approx(expected_calibration_error(predictions["label"], calibrated), abs=1e-5)
    assert validation["uncalibrated"]["brier"] == pytest.approx(brier_score(predictions["label"], raw), abs=1e-5)
    # Calibration is fitted by log-loss on these rows: it cannot make their log-loss worse.
    log_loss = lambda p: -np.mean(predictions["label"] * np.log(p) + (1 - predictions["label"]) * np.log(1 - p))  # noqa: E731
    assert log_loss(np.clip(calibrated, 1e-6, 1 - 1e-6)) <= log_loss(np.clip(raw, 1e-6, 1 - 1e-6)) + 1e-3


def test_every_scoring_path_gives_the_calibrated_probability(calibrated_run, toy_files, tmp_path, capsys):
    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()
    recorded = pd.read_csv(calibrated_run / "test_predictions.csv")
    classifier = load_classifier(calibrated_run, dtype="fp32")
    calibration = Calibration.from_metadata(json.loads((calibrated_run / METADATA_FILE).read_text()))
    assert classifier.calibration == calibration != IDENTITY

    margins = classifier.logit_margins(texts, show_progress=False)
    probabilities = classifier.unsafe_probabilities(texts, show_progress=False)
    np.testing.assert_array_equal(probabilities, expit(calibration.scale * margins + calibration.bias))
    np.testing.assert_allclose(probabilities, recorded["unsafe_probability"], atol=1e-6)
    np.testing.assert_allclose(expit(margins), recorded["uncalibrated_probability"], atol=1e-6)

    results = list(classifier.classify(texts, show_progress=False))
    np.testing.assert_array_equal([r["unsafe_probability"] for r in results], probabilities)
    assert [r["label"] for r in results] == ["unsafe" if p >= classifier.threshold else "safe" for p in probabilities]

    # The functional API: margins, and probabilities with or without the classifier's calibration.
    functional = dict(max_length=classifier.max_length, show_progress=False)
    np.testing.assert_array_equal(predict_logit_margins(classifier.model, classifier.tokenizer, texts, **functional), margins)
    np.testing.assert_array_equal(predict_unsafe_probabilities(classifier.model, classifier.tokenizer, texts,
                                                               calibration=calibration, **functional), probabilities)
    np.testing.assert_array_equal(predict_unsafe_probabilities(classifier.model, classifier.tokenizer, texts, **functional),
                                  expit(margins))

    assert infer_main(["--model-dir", str(calibrated_run), "--input-file", str(toy_files["test"]), "--json",
                       "--dtype", "fp32"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([line["unsafe_probability"] for line in lines], probabilities, atol=1e-6)

    metrics_path = tmp_path / "metrics.json"
    assert infer_main(["--model-dir", str(calibrated_run), "--input-file", str(toy_files["test"]),
                       "--label-column", "toxicity", "--metrics-out", str(metrics_path), "--dtype", "fp32"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "ece" in table[-3] and "brier" in table[-3], "ECE and Brier are printed with the other metrics"
    metrics = json.loads(metrics_path.read_text())
    recorded_metrics = json.loads((calibrated_run / "metrics.json").read_text())["test"]
    assert metrics["ece"] == pytest.approx(recorded_metrics["ece"], abs=1e-6)
    assert metrics["brier"] == pytest.approx(recorded_metrics["brier"], abs=1e-6)


def test_a_directory_saved_before_calibration_scores_as_before(calibrated_run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(calibrated_run, old)
    metadata = json.loads((old / METADATA_FILE).read_text())
    for key in ("calibration", "threshold_rule"):
        del metadata[key]
    metadata["format_version"] = 1
    (old / METADATA_FILE).write_text(json.dumps(metadata))

    texts = ["Tell me how to shoplift", "What is the capital of France?", "How do I build a bomb to attack Tokyo?"]
    classifier = load_classifier(old, dtype="fp32")
    assert classifier.calibration == IDENTITY
    with torch.inference_mode():
        logits = [classifier.model(**classifier.tokenizer([text], return_tensors="pt")).logits.float() for text in texts]
        softmax = [torch.softmax(row, -1)[0, 1].item() for row in logits]
    np.testing.assert_allclose(classifier.unsafe_probabilities(texts, show_progress=False), softmax, rtol=0, atol=1e-6)
    assert infer_main(["--model-dir", str(old), "--dtype", "fp32", "--json", "--examples", *texts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([line["unsafe_probability"] for line in lines], softmax, rtol=0, atol=1e-6)


def test_a_newer_format_is_refused(calibrated_run, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(calibrated_run, newer)
    metadata = json.loads((newer / METADATA_FILE).read_text())
    (newer / METADATA_FILE).write_text(json.dumps({**metadata, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ModelLoadError, match="newer than this toolkit reads"):
        load_classifier(newer)


def test_threshold_by_target_recall_and_temperature_are_stored(tiny_phi3, toy_files, tmp_path):
    output_dir = tmp_path / "recall"
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, "--num-layers", "0",
                                "--threshold-for-recall", "0.9", "--calibration", "temperature")
    assert train_main("full_layers", flags) == 0
    metadata = json.loads((output_dir / METADATA_FILE).read_text())
    assert metadata["threshold_rule"] == {"rule": "recall", "target": 0.9}
    assert metadata["calibration"]["method"] in ("temperature", "none") and metadata["calibration"]["bias"] == 0.0
    validation = pd.read_csv(output_dir / "validation_predictions.csv")
    assert metadata["threshold"] == pytest.approx(
        threshold_for_recall(validation["label"], validation["unsafe_probability"], 0.9), abs=1e-6)
    assert json.loads((output_dir / "metrics.json").read_text())["validation"]["recall"] >= 0.9
    assert load_classifier(output_dir).threshold == metadata["threshold"]


def test_bad_targets_are_refused_before_training(tiny_phi3, toy_files, tmp_path, capsys):
    for extra in (["--threshold-for-precision", "1.5"],
                  ["--threshold-for-precision", "0.9", "--threshold-for-recall", "0.9"]):
        assert train_main("full_layers", fast_training_flags(tiny_phi3, toy_files, tmp_path / "x", *extra)) == 2
        assert "--threshold-for" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists(), "refused before any training"


def test_an_unreached_target_keeps_the_checkpoints_and_a_rerun_resumes(tiny_phi3, toy_files, tmp_path, capsys,
                                                                         monkeypatch):
    import safety_classifier.evaluation as evaluation

    def unreachable(*args, **kwargs):
        raise ThresholdTargetError("no threshold reaches precision 0.999 on validation")

    output_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "choose_threshold", unreachable)
        flags = fast_training_flags(tiny_phi3, toy_files, output_dir, "--num-layers", "0", "--threshold-for-precision", "0.999")
        assert train_main("full_layers", flags) == 2
    error = capsys.readouterr().err
    assert "no threshold reaches precision 0.999" in error and "checkpoints are kept" in error
    assert not (output_dir / METADATA_FILE).exists()
    assert train_main("full_layers", fast_training_flags(tiny_phi3, toy_files, output_dir, "--num-layers", "0")) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((output_dir / METADATA_FILE).read_text())["threshold_rule"] == {"rule": "max_f1"}


def test_the_reliability_diagram_draws_calibrated_and_uncalibrated_curves(tmp_path):
    import report_figures

    _, margins, labels = miscalibrated(2000)
    calibration = fit_calibration(margins, labels)
    rows = [{"row": "new", "method": "calibrated run"}, {"row": "old", "method": "run from before calibration"}]
    scores = {
        "new": pd.DataFrame({"unsafe_probability": calibration.probabilities(margins),
                             "uncalibrated_probability": expit(margins), "label": labels}),
        "old": pd.DataFrame({"unsafe_probability": expit(margins), "label": labels}),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = report_figures.draw_reliability_diagram(rows, scores, tmp_path)
    assert path == tmp_path / "reliability.png" and path.stat().st_size > 10_000
