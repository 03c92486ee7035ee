"""Several training sources and the category head: data checks, the loss's masks, save and load."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, category_rows, fast_training_flags
from scipy.special import logit
from sklearn.metrics import average_precision_score

from safety_classifier.artifacts import METADATA_FILE, write_metadata
from safety_classifier.calibration import Calibration, f1_maximising_threshold, fit_calibration
from safety_classifier.categories import (
    category_folds,
    category_loss_sum,
    category_metrics,
    category_route_threshold_of,
    choose_category_thresholds,
    choose_route_threshold,
    flagged_categories,
    macro_f1,
    name_categories,
    out_of_fold_named_macro_f1,
    reported_category_scores,
    safe_row_alarms,
    unsafe_verdicts,
)
from safety_classifier.cli import infer_main, train_main
from safety_classifier.data import load_splits
from safety_classifier.errors import DataError, ModelLoadError
from safety_classifier.inference import Classifier, load_classifier
from safety_classifier.labels import MISSING_TARGET, LabelSchema
from safety_classifier.metrics import classification_metrics
from safety_classifier.sources import add_sources, parse_source_spec
from safety_classifier.trainer import class_weight_labels, class_weights_for, weighted_cross_entropy
from safety_classifier.training import training_labels


@pytest.fixture(scope="module")
def category_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("categories") / "harms.csv"
    category_rows(48, seed=3).to_csv(path, index=False)
    return path


def main_splits(toy_files):
    return load_splits(train_file=str(toy_files["train"]), validation_file=None, test_file=None,
                       text_column="user_input", label_column="toxicity", validation_fraction=0.2, seed=0)


def test_a_source_spec_is_parsed_and_bad_ones_are_refused():
    spec = parse_source_spec("data/harms.csv,text=prompt_text,category=category,weight=1.5,validation=0.25")
    assert (spec.path, spec.text_column, spec.category_column, spec.label_column) == (
        "data/harms.csv", "prompt_text", "category", None)
    assert spec.weight == 1.5 and spec.validation_fraction == 0.25 and spec.name == "harms"
    for bad, says in [("f.csv,category=c", "text=COLUMN"), ("f.csv,text=t", "label=COLUMN, category=COLUMN"),
                      ("f.csv,text=t,category=c,colour=red", "colour=red"), ("f.csv,text=t,label=l,weight=0", "weight"),
                      ("f.csv,text=t,label=l,validation=2", "validation")]:
        with pytest.raises(DataError, match=says):
            parse_source_spec(bad)


def test_sources_with_different_columns_join_with_masks_where_a_row_has_no_label(toy_files, category_file):
    main = main_splits(toy_files)
    splits, schema = add_sources(main, "train", [f"{category_file},text=prompt_text,category=category,validation=0.25"],
                                 seed=0, validation_fraction=0.2)
    assert schema.codes == ["S1", "S2", "S8", "S9"]
    assert schema.id2label[2] == "S1" and schema.categories[3].name == "Hate"
    train = splits.train
    assert len(train) == len(main.train) + 36 and set(train.sources) == {"train", "harms"}
    from_main = train.sources == "train"
    # Main source: by default no row carries a category target (ToxicChat says that, not why)...
    assert (train.categories[from_main] == MISSING_TARGET).all()
    # ...and with the negatives, safe rows are every category's 0, unsafe rows still carry none.
    with_negatives, _ = add_sources(main, "train", [f"{category_file},text=prompt_text,category=category,validation=0.25"],
                                    seed=0, validation_fraction=0.2, safe_rows_category_negatives=True)
    main_rows = with_negatives.train.sources == "train"
    assert (with_negatives.train.categories[main_rows & (with_negatives.train.labels == 0)] == 0).all()
    assert (with_negatives.train.categories[main_rows & (with_negatives.train.labels == 1)] == MISSING_TARGET).all()
    # Category source: unsafe by the default policy, one category each; validation stratified by category.
    assert (train.labels[~from_main] == 1).all() and (train.categories[~from_main].sum(axis=1) == 1).all()
    held_out = splits.validation.categories[splits.validation.sources == "harms"]
    assert (held_out.sum(axis=0) == 3).all()
    assert splits.test is None
    # The epochs' validation keeps the main source's binary labels only; every row keeps its category targets.
    validation = splits.validation
    epoch_labels = np.asarray(training_labels(validation, splits.calibration_rows))
    from_main = validation.sources == "train"
    assert (epoch_labels[~from_main, 0] == -1).all()
    np.testing.assert_array_equal(epoch_labels[from_main, 0], validation.labels[from_main])
    np.testing.assert_array_equal(epoch_labels[:, 1:], validation.categories)


def test_the_contextual_policy_leaves_contextual_rows_without_a_binary_label(toy_files, category_file):
    splits, _ = add_sources(main_splits(toy_files), "train", [f"{category_file},text=prompt_text,category=category"],
                            seed=0, validation_fraction=0.2, category_rows_binary="unsafe_except_contextual",
                            contextual_categories=["S2"])
    train = splits.train
    s2 = train.categories[:, 1] == 1
    assert (train.labels[s2] == -1).all() and (train.labels[(train.sources == "harms") & ~s2] == 1).all()
    assert len(splits.validation.binary_rows) < len(splits.validation)
    weights = class_weights_for(train.labels)  # unlabelled rows are not counted
    assert torch.isfinite(weights).all() and weights.shape == (2,)


def test_class_weights_from_the_main_source_ignore_the_unsafe_rows_of_further_sources(toy_files, category_file):
    splits, _ = add_sources(main_splits(toy_files), "train", [f"{category_file},text=prompt_text,category=category"],
                            seed=0, validation_fraction=0.2)
    from_main = splits.train.labels[splits.train.sources == "train"]
    np.testing.assert_array_equal(class_weight_labels(splits, "main_source"), from_main)
    np.testing.assert_array_equal(class_weight_labels(splits, "all"), splits.train.labels)
    main_only = class_weights_for(class_weight_labels(splits, "main_source"))
    assert torch.allclose(main_only, class_weights_for(from_main))
    # The category rows are all unsafe: counted, they lower the unsafe weight.
    assert class_weights_for(class_weight_labels(splits, "all"))[1] < main_only[1]
    with pytest.raises(ValueError, match="all or main_source"):
        class_weight_labels(splits, "everything")


def test_weights_repeat_a_sources_training_rows(toy_files, category_file):
    spec = f"{category_file},text=prompt_text,category=category,validation=0.25"
    once, _ = add_sources(main_splits(toy_files), "train", [spec], seed=0, validation_fraction=0.2)
    twice, _ = add_sources(main_splits(toy_files), "train", [spec + ",weight=2"], seed=0, validation_fraction=0.2)
    count = lambda splits: int((splits.train.sources == "harms").sum())  # noqa: E731
    assert count(twice) == 2 * count(once)
    assert len(twice.validation) == len(once.validation)  # validation rows are never repeated


def test_the_main_sources_weight_repeats_its_training_rows_only(toy_files, category_file):
    spec = f"{category_file},text=prompt_text,category=category,validation=0.25"
    once, _ = add_sources(main_splits(toy_files), "train", [spec], seed=0, validation_fraction=0.2)
    more, _ = add_sources(main_splits(toy_files), "train", [spec], seed=0, validation_fraction=0.2, main_weight=2.5)
    main = lambda splits: np.asarray(splits.train.texts, dtype=object)[splits.train.sources == "train"]  # noqa: E731
    assert len(main(more)) == round(2.5 * len(main(once)))
    assert set(main(more)) == set(main(once)), "the same rows, repeated: none drawn from validation"
    assert int((more.train.sources == "harms").sum()) == int((once.train.sources == "harms").sum())
    assert list(more.validation.texts) == list(once.validation.texts)


@pytest.mark.parametrize("content, says", [
    ("prompt_text,hazard\nhello,vcr\n", r"harms\.csv: no column 'category'.*columns present: prompt_text, hazard"),
    ("prompt_text,category\nhello,S1\nworld,\nagain,S2\n", r"harms\.csv: column 'category' has no category at row\(s\) 2"),
    ("text,category\nhello,S1\n", r"harms\.csv: no column 'prompt_text'"),
])
def test_a_category_file_with_a_missing_column_or_an_empty_category_names_file_column_and_row(
        toy_files, tmp_path, content, says):
    path = tmp_path / "harms.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=says):
        add_sources(main_splits(toy_files), "train", [f"{path},text=prompt_text,category=category"],
                    seed=0, validation_fraction=0.2)


def test_a_taxonomy_file_names_categories_and_refuses_codes_outside_it(toy_files, category_file, tmp_path):
    taxonomy = tmp_path / "taxonomy.json"
    taxonomy.write_text(json.dumps({"S1": "Violence", "S2": "Theft", "S8": "Weapons", "S9": "Hate speech"}))
    _, schema = add_sources(main_splits(toy_files), "train", [f"{category_file},text=prompt_text,category=category"],
                            seed=0, validation_fraction=0.2, taxonomy_file=str(taxonomy))
    assert [c.name for c in schema.categories] == ["Violence", "Theft", "Weapons", "Hate speech"]
    taxonomy.write_text(json.dumps({"S1": "Violence"}))
    with pytest.raises(DataError, match=r"holds 'S2' at row\(s\) 2, .*not a code of the taxonomy \(S1\)"):
        add_sources(main_splits(toy_files), "train", [f"{category_file},text=prompt_text,category=category"],
                    seed=0, validation_fraction=0.2, taxonomy_file=str(taxonomy))


def test_rows_without_a_label_add_no_loss_of_that_kind():
    logits = torch.randn(4, 2 + 3, requires_grad=True)
    labels = torch.tensor([[1, 0, 1, 0],        # binary and categories
                           [0, 0, 0, 0],        # safe: every category 0
                           [-1, 1, 0, 0],       # a contextual category: no binary label
                           [1, -1, -1, -1]],    # unsafe without a category
                          dtype=torch.float32)
    loss = weighted_cross_entropy(torch.ones(2), rows_per_step=4.0)({"logits": logits}, labels)
    loss.backward()
    gradient = logits.grad
    assert gradient[2, :2].abs().sum() == 0 and gradient[2, 2:].abs().sum() > 0
    assert gradient[3, 2:].abs().sum() == 0 and gradient[3, :2].abs().sum() > 0
    assert gradient[0].abs().min() > 0 and gradient[1, 2:].abs().min() > 0
    # The category part is the mean BCE over categories, summed over labelled rows.
    expected = category_loss_sum(logits[:, 2:].detach(), labels[:, 1:])
    manual = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[i, 2:].detach(), labels[i, 1:])
                 for i in range(3))
    assert expected.item() == pytest.approx(manual.item(), rel=1e-6)
    # --category-loss-weight scales the category part only.
    binary_only = weighted_cross_entropy(torch.ones(2), rows_per_step=4.0, category_loss_weight=0.0)(
        {"logits": logits.detach()}, labels)
    tripled = weighted_cross_entropy(torch.ones(2), rows_per_step=4.0, category_loss_weight=3.0)(
        {"logits": logits.detach()}, labels)
    assert (tripled - binary_only).item() == pytest.approx(3 * expected.item() / 4.0, rel=1e-5)
    assert loss.item() == pytest.approx(binary_only.item() + expected.item() / 4.0, rel=1e-5)
    with pytest.raises(ValueError, match="category-loss-weight"):
        weighted_cross_entropy(torch.ones(2), category_loss_weight=-1.0)


def test_joint_scores_flags_and_safe_row_alarms_on_a_known_case():
    unsafe = np.array([0.1, 0.9, 0.2, 0.3])
    sigmoids = np.array([[0.6, 0.0], [0.6, 0.0], [0.1, 0.7], [0.1, 0.1]])
    np.testing.assert_allclose(reported_category_scores(sigmoids, unsafe, "joint"), sigmoids * unsafe[:, None])
    assert reported_category_scores(sigmoids, unsafe, "conditional") is sigmoids
    thresholds = np.array([0.5, 0.7])
    # A category is flagged only under an unsafe verdict (row 1), at or over its own threshold.
    assert flagged_categories(unsafe, sigmoids, 0.5, thresholds).tolist() == [[False, False], [True, False],
                                                                             [False, False], [False, False]]
    # Rows 0-2 have a score at or over its threshold (row 2 exactly at S2's); only row 1 is also called unsafe.
    assert safe_row_alarms(unsafe, sigmoids, 0.5, thresholds) == {
        "safe_rows_category_score_over_threshold": 0.75, "safe_rows_flagged_with_a_category": 0.25, "safe_rows_n": 4}
    # Joint scores keep ordinary traffic low: none of these safe rows passes a threshold any more.
    assert safe_row_alarms(unsafe, sigmoids * unsafe[:, None], 0.5, thresholds)["safe_rows_category_score_over_threshold"] == 0.25


def test_the_route_threshold_reaches_the_recall_with_a_margin_and_is_none_where_not_needed():
    binary = np.array([True, False, False, False, True])  # rows 0 and 4 are unsafe by P(unsafe) anyway
    largest = np.array([0.9, 0.5, 0.2, 0.05, 0.0])
    # 4 of 5: rows 1 and 2 join; half-way in log-odds between row 2's 0.2 and row 3's 0.05
    # (odds 1/4 and 1/19), so that row 2 does not sit on the line.
    assert choose_route_threshold(binary, largest, 0.8) == pytest.approx(1 / (1 + (4 * 19) ** 0.5))
    assert choose_route_threshold(binary, largest, 0.6) == pytest.approx(1 / (1 + (1 * 4) ** 0.5))
    assert choose_route_threshold(binary, largest, 1.0) == pytest.approx(0.05)  # every missed row: no lower one
    for target in (0.6, 0.8, 1.0):
        threshold = choose_route_threshold(binary, largest, target)
        assert unsafe_verdicts(np.where(binary, 1.0, 0.0), largest[:, None], 0.5, threshold).mean() >= target
    assert choose_route_threshold(binary, largest, 0.4) is None  # the binary verdict alone reaches 2 of 5
    with pytest.raises(ValueError, match="target recall"):
        choose_route_threshold(binary, largest, 0.0)


def test_a_route_calls_unsafe_what_the_categories_flag_and_names_the_category():
    unsafe = np.array([0.1, 0.9, 0.2, 0.3])
    scores = np.array([[0.35, 0.0], [0.1, 0.0], [0.1, 0.2], [0.0, 0.5]])
    thresholds = np.array([0.5, 0.7])
    assert unsafe_verdicts(unsafe, scores, 0.5).tolist() == [False, True, False, False]
    assert unsafe_verdicts(unsafe, scores, 0.5, 0.3).tolist() == [True, True, False, True]
    assert unsafe_verdicts(unsafe, None, 0.5, 0.3).tolist() == [False, True, False, False]  # a binary classifier
    # Routed rows 0 and 3 name their top category although it is under its own threshold; so does
    # row 1, unsafe by P(unsafe) with no score at a threshold: an unsafe verdict names a harm. Row 2 is safe.
    assert flagged_categories(unsafe, scores, 0.5, thresholds, 0.3).tolist() == [
        [True, False], [True, False], [False, False], [False, True]]
    assert safe_row_alarms(unsafe, scores, 0.5, thresholds, 0.3)["safe_rows_flagged_with_a_category"] == 0.75
    # Without a route, only row 1 is unsafe, and it names its top category.
    assert flagged_categories(unsafe, scores, 0.5, thresholds).tolist() == [
        [False, False], [True, False], [False, False], [False, False]]
    # The metrics count the verdicts given; AUPRC stays P(unsafe)'s.
    labels = np.array([1, 1, 0, 0])
    routed = classification_metrics(labels, unsafe, 0.5, predicted=unsafe_verdicts(unsafe, scores, 0.5, 0.3))
    plain = classification_metrics(labels, unsafe, 0.5)
    assert (routed["recall"], routed["precision"], plain["recall"], plain["precision"]) == (1.0, 2 / 3, 0.5, 1.0)
    assert routed["auprc"] == plain["auprc"]


def test_a_classifier_applies_its_stored_route_and_refuses_a_bad_one():
    metadata = {"categories": [{"code": "S1", "name": "Violent Crimes", "threshold": 0.6},
                               {"code": "S6", "name": "Privacy", "threshold": 0.6}],
                "category_score_rule": "conditional", "category_route_threshold": 0.25}
    classifier = Classifier(model=None, tokenizer=None, threshold=0.5, max_length=16, metadata=metadata)
    routed = classifier.verdict([0.1, 0.05, 0.3])
    assert routed["label"] == "unsafe" and routed["categories"] == {"S1": False, "S6": True}
    assert classifier.verdict([0.1, 0.05, 0.2])["label"] == "safe"
    assert classifier.unsafe(np.array([[0.1, 0.05, 0.3], [0.7, 0.0, 0.0], [0.1, 0.0, 0.0]])).tolist() == [True, True, False]
    assert category_route_threshold_of({**metadata, "category_route_threshold": None}) is None
    for bad in (1.5, "0.2", True):
        with pytest.raises(ModelLoadError, match="category_route_threshold"):
            category_route_threshold_of({**metadata, "category_route_threshold": bad})
    with pytest.raises(ModelLoadError, match="without a category head"):
        category_route_threshold_of({"category_route_threshold": 0.2})


def test_category_thresholds_and_metrics_on_a_known_case():
    schema = LabelSchema.from_codes(["S1", "S2"])
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=np.float32)
    scores = np.array([[0.9, 0.1], [0.6, 0.3], [0.2, 0.8], [0.7, 0.4], [0.1, 0.9]])
    thresholds = choose_category_thresholds(targets, scores)
    assert thresholds[0] == pytest.approx(0.6) and thresholds[1] == pytest.approx(0.4)
    metrics = category_metrics(schema, targets, scores, thresholds)
    assert metrics["per_category"]["S1"]["recall"] == 1.0 and metrics["per_category"]["S1"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_category"]["S2"]["f1"] == 1.0
    assert metrics["confusion"]["rows_true_columns_top_scored"] == [[2, 0], [1, 2]]
    assert metrics["top1_accuracy"] == pytest.approx(4 / 5)
    assert metrics["macro"]["f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert 0.0 <= metrics["named_macro_f1_out_of_fold"] <= 1.0


def test_out_of_fold_naming_judges_each_half_with_the_other_halfs_thresholds():
    targets = np.zeros((12, 3), dtype=np.int64)
    targets[:6, 0] = targets[6:10, 1] = targets[10:, 2] = 1
    for seed in range(4):  # each category's rows dealt evenly to the two halves, whatever the seed
        folds = category_folds(targets, seed)
        assert (folds[:6].sum(), folds[6:10].sum(), folds[10:].sum()) == (3, 2, 1)
    # Row 5 has no score at any threshold fitted on rows 0-4's 0.9s: named by its top score, still right.
    scores = np.where(targets == 1, 0.9, 0.1)
    scores[5, 0] = 0.3
    assert name_categories(scores[[5]], np.array([0.9, 0.9, 0.9])).tolist() == [[True, False, False]]
    assert out_of_fold_named_macro_f1(targets, scores) == 1.0
    assert macro_f1(targets, scores >= 0.5) == pytest.approx((2 * 5 / 11 + 1 + 1) / 3)  # thresholds at 0.5 miss row 5
    # Scores that rank every row's own category last name it wrong in both halves.
    assert out_of_fold_named_macro_f1(targets, 1.0 - scores) < 0.5


@pytest.fixture(scope="module")
def category_classifier(tiny_phi3, toy_files, category_file, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("category-lora")
    # Category rows labelled unsafe, no safe-row negatives: the joint score rule, whose tests follow.
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, "--lora-r", "4", "--dtype", "fp32", "--merge",
                                "--extra-train-sources", f"{category_file},text=prompt_text,category=category,validation=0.25",
                                "--category-rows-binary", "unsafe", "--safe-rows-category-negatives", "false")
    assert train_main("lora", flags) == 0
    return output_dir


def test_a_category_run_saves_categories_thresholds_and_per_source_metrics(category_classifier):
    metadata = json.loads((category_classifier / METADATA_FILE).read_text())
    # The tiny model's P(unsafe) misses harmful validation rows, so training stored a category route.
    assert metadata["format_version"] == 5 and metadata["category_score_rule"] == "joint"
    route = metadata["category_route_threshold"]
    assert [entry["code"] for entry in metadata["categories"]] == ["S1", "S2", "S8", "S9"]
    assert all(0.0 <= entry["threshold"] <= 1.0 for entry in metadata["categories"])
    assert metadata["labels"] == {"0": "safe", "1": "unsafe", "2": "S1", "3": "S2", "4": "S8", "5": "S9"}
    metrics = json.loads((category_classifier / "metrics.json").read_text())
    validation = metrics["validation"]
    assert set(validation["sources"]) == {"train", "harms"}
    categories = validation["categories"]
    assert set(categories["per_category"]) == {"S1", "S2", "S8", "S9"} and categories["n"] == 12
    assert {"macro", "confusion", "binary_recall", "binary_recall_per_category"} <= set(categories)
    assert categories["category_route_threshold"] == route
    assert categories["binary_recall_harmful_without_route"] < 0.9 <= categories["binary_recall_harmful"]
    # The stored thresholds reproduce the verdicts behind the recall and the main source's metrics.
    rows = pd.read_csv(category_classifier / "validation_predictions.csv", keep_default_na=False)
    scores = rows[[f"score_{code}" for code in ("S1", "S2", "S8", "S9")]].to_numpy()
    unsafe = unsafe_verdicts(rows["unsafe_probability"].to_numpy(), scores, metadata["threshold"], route)
    assert unsafe[(rows["category"] != "").to_numpy()].mean() == pytest.approx(categories["binary_recall"])
    main = (rows["source"] == "train").to_numpy()
    assert validation["recall"] == pytest.approx(unsafe[main & (rows["label"] == 1).to_numpy()].mean())
    assert "test" in metrics and "categories" not in metrics["test"]
    # Category alarms on the safe rows: the main source's validation rows, and the test file's.
    validation_rows = pd.read_csv(category_classifier / "validation_predictions.csv")
    assert categories["safe_rows_n"] == int(((validation_rows["source"] == "train") & (validation_rows["label"] == 0)).sum())
    assert metrics["test"]["safe_rows_n"] == int((pd.read_csv(category_classifier / "test_predictions.csv")["label"] == 0).sum())
    # The test file's shares follow from its predictions and the stored thresholds. A prompt the route
    # made unsafe names its top category under that category's own threshold, so either share may be
    # the larger; the flagged ones are among those called unsafe.
    test = metrics["test"]
    test_rows = pd.read_csv(category_classifier / "test_predictions.csv")
    safe = test_rows[test_rows["label"] == 0]
    safe_scores = safe[[f"score_{code}" for code in ("S1", "S2", "S8", "S9")]].to_numpy()
    thresholds = np.array([entry["threshold"] for entry in metadata["categories"]])
    over = (safe_scores >= thresholds[None, :]).any(axis=1).mean()
    assert test["safe_rows_category_score_over_threshold"] == pytest.approx(over)
    called_unsafe = unsafe_verdicts(safe["unsafe_probability"].to_numpy(), safe_scores, metadata["threshold"], route)
    assert 0.0 <= test["safe_rows_flagged_with_a_category"] <= called_unsafe.mean()
    predictions = pd.read_csv(category_classifier / "validation_predictions.csv", keep_default_na=False)
    assert {"source", "category", "score_S1", "score_S9"} <= set(predictions.columns)
    assert (predictions["category"] != "").sum() == 12


def test_calibration_and_threshold_are_fitted_on_the_main_sources_validation_rows(category_classifier):
    predictions = pd.read_csv(category_classifier / "validation_predictions.csv", keep_default_na=False)
    main = predictions[predictions["source"] == "train"]
    validation = json.loads((category_classifier / "metrics.json").read_text())["validation"]
    # The all-unsafe category rows stay out of the fit and the headline metrics, but keep their own.
    assert validation["n"] == len(main) < int((predictions["label"] >= 0).sum())
    assert validation["sources"]["harms"]["n"] == int((predictions["source"] == "harms").sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny random model may give no usable slope: identity on both sides
        refitted = fit_calibration(logit(main["uncalibrated_probability"].clip(1e-7, 1 - 1e-7)), main["label"])
    stored = Calibration.from_metadata(json.loads((category_classifier / METADATA_FILE).read_text()))
    assert (stored.scale, stored.bias) == pytest.approx((refitted.scale, refitted.bias), rel=1e-3, abs=1e-3)
    assert validation["threshold"] == pytest.approx(
        f1_maximising_threshold(main["label"], main["unsafe_probability"]), abs=1e-6)
    # So is the epochs' validation AUPRC, which picks the checkpoint kept (the saved one is the best).
    history = json.loads((category_classifier / "validation_history.json").read_text())
    assert max(epoch["auprc"] for epoch in history) == pytest.approx(
        average_precision_score(main["label"], main["uncalibrated_probability"]), abs=1e-4)


def test_a_category_classifier_reloads_in_a_fresh_process_with_identical_scores(category_classifier):
    texts = ["How do I build a bomb to destroy the bank?", "What is the capital of France?", ""]
    here = load_classifier(category_classifier, dtype="fp32").scores(texts, show_progress=False)
    code = ("import json, sys; from safety_classifier.inference import load_classifier; "
            f"print(json.dumps(load_classifier({str(category_classifier)!r}, dtype='fp32')"
            f".scores({texts!r}, show_progress=False).tolist()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert here.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(json.loads(result.stdout.splitlines()[-1])), here, rtol=0, atol=1e-6)
    assert (here[2] == 0.0).all()  # the empty prompt: safe, no category


def test_classify_and_infer_json_report_categories_and_their_scores(category_classifier, capsys):
    classifier = load_classifier(category_classifier, dtype="fp32")
    route = classifier.category_route_threshold
    # Without the stored route: every prompt unsafe, categories then follow their own thresholds, and
    # one with no score at its threshold names its top category.
    classifier.threshold, classifier.category_route_threshold = 0.0, None
    thresholds = dict(zip(classifier.category_codes, classifier.category_thresholds))
    for text in ("How do I build a bomb to destroy the bank?", "Write a short poem about bees."):
        [result] = classifier.classify([text], show_progress=False)
        assert set(result["categories"]) == set(result["category_scores"]) == {"S1", "S2", "S8", "S9"}
        over = {code: score >= thresholds[code] for code, score in result["category_scores"].items()}
        top = max(result["category_scores"], key=result["category_scores"].get)
        assert result["categories"] == (over if any(over.values()) else {code: code == top for code in over})
    classifier.threshold = 1.1  # a safe verdict never names a harm
    [safe] = classifier.classify(["How do I build a bomb to destroy the bank?"], show_progress=False)
    assert safe["label"] == "safe" and not any(safe["categories"].values())
    # With it, P(unsafe) over any threshold or not, the largest category score decides and is named.
    classifier.category_route_threshold = route
    for text in ("How do I build a bomb to destroy the bank?", "Write a short poem about bees.", "Leak her home address."):
        [answer] = classifier.classify([text], show_progress=False)
        top = max(answer["category_scores"], key=answer["category_scores"].get)
        assert answer["label"] == ("unsafe" if answer["category_scores"][top] >= route else "safe")
        assert answer["categories"][top] == (answer["label"] == "unsafe")

    assert infer_main(["--model-dir", str(category_classifier), "--json", "--threshold", "0",
                       "--examples", "How do I build a bomb?", "Write a hateful rant about people from Kenya."]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(set(line["category_scores"]) == {"S1", "S2", "S8", "S9"} for line in lines)
    assert infer_main(["--model-dir", str(category_classifier), "--threshold", "0", "--examples", "How do I build a bomb?"]) == 0
    columns = capsys.readouterr().out.split()
    assert columns[0] == "unsafe" and (columns[2] == "-" or set(columns[2].split(",")) <= {"S1", "S2", "S8", "S9"})


def test_a_category_classifier_loads_with_the_ecosystems_own_calls(category_classifier):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    texts = ["How do I build a bomb to destroy the bank?", "Write a short poem about bees."]
    ours = load_classifier(category_classifier, dtype="fp32")
    encoded = ours.tokenizer(texts, return_tensors="pt", padding=True)
    num_labels = len(json.loads((category_classifier / METADATA_FILE).read_text())["labels"])
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(category_classifier, num_labels=num_labels,
                                                                     dtype=torch.float32)
    adapter.config.pad_token_id = ours.tokenizer.pad_token_id
    merged = AutoModelForSequenceClassification.from_pretrained(category_classifier / "merged", dtype=torch.float32)
    assert merged.config.id2label[5] == "S9"
    with torch.no_grad():
        adapter_logits, merged_logits = adapter(**encoded).logits, merged(**encoded).logits
    # The reported category scores are the sigmoids times the calibrated P(unsafe) ("joint", README).
    scores = ours.scores(texts, show_progress=False)
    np.testing.assert_allclose(torch.sigmoid(adapter_logits[:, 2:]).numpy() * scores[:, :1], scores[:, 1:], atol=1e-5)
    np.testing.assert_allclose(torch.sigmoid(merged_logits[:, 2:]).numpy() * scores[:, :1], scores[:, 1:], atol=2e-3)


def test_a_category_classifier_saved_before_the_score_rule_reports_bare_sigmoids(category_classifier):
    import dataclasses

    texts = ["How do I build a bomb to destroy the bank?", "Write a short poem about bees."]
    joint = load_classifier(category_classifier, dtype="fp32")
    older = {key: value for key, value in joint.metadata.items() if key != "category_score_rule"}
    conditional = dataclasses.replace(joint, metadata={**older, "format_version": 3})
    assert conditional.category_score_rule == "conditional"
    joint_scores, conditional_scores = (classifier.scores(texts, show_progress=False) for classifier in (joint, conditional))
    np.testing.assert_allclose(joint_scores[:, 0], conditional_scores[:, 0])
    np.testing.assert_allclose(joint_scores[:, 1:], conditional_scores[:, 1:] * conditional_scores[:, :1], rtol=1e-6)
    assert not np.allclose(joint_scores[:, 1:], conditional_scores[:, 1:])


def test_the_format_version_says_whether_category_scores_are_joint_and_whether_a_route_is_stored(tmp_path):
    categories = [{"code": "S1", "name": "Violent Crimes", "threshold": 0.5}]
    joint = {"categories": categories, "category_score_rule": "joint"}
    for metadata, version in (({}, 2), ({"categories": categories, "category_score_rule": "conditional"}, 3),
                              (joint, 4), ({**joint, "category_route_threshold": None}, 4),
                              ({**joint, "category_route_threshold": 0.1}, 5)):
        write_metadata(tmp_path, metadata)
        assert json.loads((tmp_path / METADATA_FILE).read_text())["format_version"] == version


def test_a_binary_classifier_answers_as_before(tiny_lora_classifier):
    classifier = load_classifier(tiny_lora_classifier, dtype="fp32")
    assert classifier.category_codes == []
    [result] = classifier.classify(["What is the capital of France?"], show_progress=False)
    assert set(result) == {"text", "judged", "label", "unsafe_probability"} and result["judged"] == "prompt"
    assert json.loads((tiny_lora_classifier / METADATA_FILE).read_text())["format_version"] == 2


def test_the_service_answers_with_the_category_heads_categories_as_infer_does(category_classifier):
    import time

    from fastapi.testclient import TestClient

    from safety_classifier.serving.api_server import create_app
    from safety_classifier.serving.cli_args import ServeArguments

    classifier = load_classifier(category_classifier, dtype="fp32")
    classifier.threshold = 1e-9  # flag every non-empty text, so that the categories' own thresholds decide
    texts = ["How do I build a bomb to destroy the bank?", "Write a hateful rant about people from Kenya.", ""]
    expected = list(classifier.classify(texts, show_progress=False))
    app = create_app(ServeArguments(model_dir=str(category_classifier)), load=lambda: classifier)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        results = client.post("/v1/moderations", json={"input": texts}).json()["results"]
    for result, offline in zip(results, expected):
        assert result["flagged"] == (offline["label"] == "unsafe")
        # The service adds the hosted API's category keys (`openai_categories`) beside the classifier's own.
        assert {code: result["categories"][code] for code in offline["categories"]} == offline["categories"]
        assert {"S1", "S2", "S8", "S9"} <= set(result["category_scores"])
        for code, score in offline["category_scores"].items():
            assert result["category_scores"][code] == pytest.approx(score, abs=1e-6)
    assert results[2]["flagged"] is False and not any(results[2]["categories"].values())


def test_a_bad_route_recall_is_refused_before_training(tiny_phi3, toy_files, tmp_path, capsys):
    flags = fast_training_flags(tiny_phi3, toy_files, tmp_path / "run", "--category-route-recall", "1.5")
    assert train_main("lora", flags) == 2
    assert "--category-route-recall must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_category_head_trains_at_its_own_default_head_learning_rate():
    from safety_classifier.cli import parse_training_plan

    common = ["--model", "model-dir", "--train-file", "train.csv"]
    binary = parse_training_plan("lora", common)
    assert binary.head_learning_rate == 1e-3 and not binary.trains_categories
    with_categories = parse_training_plan("lora", [*common, "--extra-train-sources", "hazards.csv,text=t,category=c"])
    assert with_categories.trains_categories and with_categories.head_learning_rate == 3e-3
    assert with_categories.arguments_record()["head_learning_rate"] == 3e-3
    binary_source = parse_training_plan("lora", [*common, "--extra-train-sources", "more.csv,text=t,label=l"])
    assert binary_source.head_learning_rate == 1e-3
    chosen = parse_training_plan("full_layers", [*common, "--extra-train-sources", "hazards.csv,text=t,category=c",
                                                "--head-learning-rate", "5e-4"])
    assert chosen.head_learning_rate == 5e-4
