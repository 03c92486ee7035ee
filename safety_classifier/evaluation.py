"""Evaluation of a trained classifier: per-epoch validation metrics, then the saved classifier's
calibration, thresholds and metrics on validation and test, and the prediction files.

The saved classifier is scored as reloaded from disk, so metrics.json describes exactly what
`infer.py` will answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from sklearn.metrics import average_precision_score
from transformers import EvalPrediction, Trainer

from .arguments import TrainingPlan
from .calibration import (
    IDENTITY,
    Calibration,
    bootstrap_f1_interval,
    brier_score,
    choose_threshold,
    describe_rule,
    expected_calibration_error,
    f1_maximising_threshold,
    fit_calibration,
)
from .categories import (
    category_metrics,
    category_rows,
    choose_category_thresholds,
    choose_route_threshold,
    format_category_table,
    reported_category_scores,
    row_categories,
    rows_with_a_category,
    safe_row_alarms,
    unsafe_verdicts,
)
from .data import LabelledSplit, Splits
from .errors import DataError, ThresholdTargetError
from .inference import category_scores_of, margins_of, predict_logits
from .labels import LabelSchema, split_logits
from .metrics import classification_metrics, format_metrics_table, ranking_metric
from .refusals import REFUSALS_SOURCE
from .sources import LOOKALIKE_SOURCES, judged_response_rows


def trainer_metrics(eval_prediction: EvalPrediction) -> dict:
    """Per-epoch validation metrics of the safe/unsafe decision, on the rows that have a binary
    label; scores stay paired with `label_ids` whatever the sampler's order. With a category head,
    also the categories' macro AUPRC on the rows with category targets."""
    labels, targets = epoch_labels(eval_prediction)
    margins, category_logits = split_logits(epoch_logits(eval_prediction))
    probabilities = expit(margins)
    labelled = labels >= 0
    labels, probabilities = labels[labelled], probabilities[labelled]
    metrics = classification_metrics(labels, probabilities, f1_maximising_threshold(labels, probabilities))
    metrics = {key: value for key, value in metrics.items() if key != "n" and value is not None}
    rows = category_rows(targets) if targets is not None else []
    if len(rows):
        aps = [average_precision_score(targets[rows, i], category_logits[rows, i])
               for i in range(targets.shape[1]) if 0 < targets[rows, i].sum() < len(rows)]
        if aps:
            metrics["category_macro_auprc"] = float(np.mean(aps))
    return metrics


def epoch_logits(eval_prediction: EvalPrediction) -> np.ndarray:
    """The logits of the Trainer's validation rows (the first output where the model gave several)."""
    logits = eval_prediction.predictions
    return np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)


def epoch_labels(eval_prediction: EvalPrediction) -> tuple[np.ndarray, np.ndarray | None]:
    """(binary labels, category targets or None) of the Trainer's validation rows."""
    labels = np.asarray(eval_prediction.label_ids)
    if labels.ndim == 2:
        return labels[:, 0].astype(np.int64), labels[:, 1:]
    return labels.astype(np.int64), None


MIXTURE_OBJECTIVE = "mixture_objective"


def mixture_objective(main_auprc: float, source_macro_auprc: float) -> float:
    """The mean of the main source's validation AUPRC and of the mean AUPRC over the prompt sources:
    with several sources, the checkpoint kept and the mixture search (experiments/) maximise it, so
    that neither the main source's style nor the others' decides alone."""
    return (main_auprc + source_macro_auprc) / 2


class EpochMetrics:
    """The Trainer's `compute_metrics`: `trainer_metrics` (on the main source's rows, the only ones
    whose binary label the validation set carries, see `training_labels`), and with several sources
    each prompt source's AUPRC as metrics.json measures it, their mean and the mixture objective,
    which then keeps the checkpoint (`best_metric`). The Trainer's validation batches reorder the
    rows (by length) and carry no source: `row_order()` gives the validation rows' indices in the
    order the predictions come in (the Trainer's `eval_row_order`; None for other rows), checked
    against the labels and category targets that do come with them (`check_row_order`)."""

    def __init__(self, splits: Splits, row_order=None):
        self.splits = splits
        self.row_order = row_order

    @staticmethod
    def best_metric(splits: Splits) -> str:
        return MIXTURE_OBJECTIVE if splits.validation.sources is not None else "auprc"

    def __call__(self, eval_prediction: EvalPrediction) -> dict:
        metrics = trainer_metrics(eval_prediction)
        validation = self.splits.validation
        order = self.row_order() if self.row_order is not None else None
        if validation.sources is None or order is None or "auprc" not in metrics:
            return metrics  # one source, or predictions of other rows than the validation set's
        check_row_order(order, self.splits, eval_prediction)
        margins, _ = split_logits(epoch_logits(eval_prediction))
        scores = np.empty(len(validation))
        scores[order] = expit(margins)  # as `trainer_metrics` scores the main source's rows
        rows = validation.binary_rows
        auprcs = prompt_source_auprcs(validation.subset(rows), scores[rows], self.splits.main_source)
        metrics.update({f"auprc:{name}": value for name, value in auprcs.items()})
        metrics["source_macro_auprc"] = float(np.mean(list(auprcs.values())))
        metrics[MIXTURE_OBJECTIVE] = mixture_objective(metrics["auprc"], metrics["source_macro_auprc"])
        return metrics


def check_row_order(order: np.ndarray, splits: Splits, eval_prediction: EvalPrediction) -> None:
    """The labels that came with the predictions must be the validation rows' in `order`: the main
    source's binary labels (the others' are -1) and, with a category head, every row's targets."""
    validation = splits.validation
    binary, targets = epoch_labels(eval_prediction)
    expected = np.full(len(validation), -1)
    expected[splits.calibration_rows] = validation.labels[splits.calibration_rows]
    same = len(order) == len(validation) == len(binary) and np.array_equal(expected[order], binary)
    if same and targets is not None and validation.categories is not None:
        same = np.array_equal(validation.categories[order].astype(np.float32), targets.astype(np.float32))
    if not same:
        raise RuntimeError("the validation predictions do not come in the order the Trainer's loader gave")


def validation_history(trainer: Trainer) -> list[dict]:
    """The validation metrics after each epoch, as the Trainer logged them."""
    keys = ("auprc", "roc_auc", "f1", "precision", "recall", "accuracy", "loss", "category_macro_auprc",
            "source_macro_auprc", MIXTURE_OBJECTIVE)
    return [
        {"epoch": entry["epoch"], **{key: entry[f"eval_{key}"] for key in keys if f"eval_{key}" in entry},
         **({"source_auprc": {key.removeprefix("eval_auprc:"): value for key, value in entry.items()
                              if key.startswith("eval_auprc:")}} if "eval_source_macro_auprc" in entry else {})}
        for entry in trainer.state.log_history
        if "eval_auprc" in entry
    ]


@dataclass
class Evaluation:
    """What `evaluate_classifier` fitted on validation and measured."""

    metrics: dict  # metrics.json
    calibration: Calibration
    threshold: float
    threshold_rule: dict
    category_thresholds: np.ndarray | None
    category_route_threshold: float | None = None
    response_threshold: float | None = None

    def metadata(self, schema: LabelSchema) -> dict:
        """The entries of `safety_classifier.json` fitted on validation."""
        categories = ({"categories": [{**entry, "threshold": float(value)} for entry, value
                                      in zip(schema.to_metadata(), self.category_thresholds)],
                       "category_route_threshold": self.category_route_threshold}
                      if self.category_thresholds is not None else {})
        responses = {"response_threshold": self.response_threshold} if self.response_threshold is not None else {}
        return {"calibration": self.calibration.to_metadata(), "threshold_rule": self.threshold_rule,
                "threshold": self.threshold, **categories, **responses}

    def summary(self, splits: Splits) -> list[str]:
        """The lines printed after training: the metrics table, calibration, threshold, categories."""
        validation = self.metrics["validation"]
        low, high = validation["f1_interval"]
        return [
            format_metrics_table(self.metrics),
            f"calibration ({self.calibration.describe()}"
            f"{f', on the {splits.main_source} rows' if splits.main_source else ''}): "
            f"validation ECE {validation['uncalibrated']['ece']:.4f} uncalibrated -> {validation['ece']:.4f}, "
            f"Brier {validation['uncalibrated']['brier']:.4f} -> {validation['brier']:.4f}",
            f"decision threshold ({describe_rule(self.threshold_rule)}, calibrated scores): {self.threshold:.4f}; "
            f"validation F1 {validation['f1']:.4f}, 95 % bootstrap interval [{low:.4f}, {high:.4f}]",
            *describe_sources_and_tasks(validation),
            *([describe_category_route(validation["categories"]),
               "categories (validation rows of the category sources; each at its own threshold):",
               format_category_table(validation["categories"])] if self.category_thresholds is not None else []),
        ]


def describe_category_route(categories: dict) -> str:
    """One line: the verdict's recall on the category validation rows, and the route's part in it."""
    share = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    recall = (f"unsafe recall on the category validation rows {share(categories['binary_recall'], '.4f')}, on those "
              f"outside the contextual categories {share(categories['binary_recall_harmful'], '.4f')}")
    route = categories.get("category_route_threshold")
    if route is None:
        return recall + " (no category route)"
    return (f"{recall}, with the category route (largest category score >= {route:.4f} is unsafe too; without "
            f"it {share(categories['binary_recall_harmful_without_route'], '.4f')}); the main source's safe "
            f"validation rows called unsafe {share(categories['safe_rows_unsafe'], '.2%')} (without the route "
            f"{share(categories['safe_rows_unsafe_without_route'], '.2%')})")


def evaluate_classifier(plan: TrainingPlan, splits: Splits, model: torch.nn.Module, tokenizer) -> Evaluation:
    """Score the validation rows with the saved classifier, fit calibration, the decision threshold
    and any category thresholds on them, then score the test file; writes the prediction files."""
    output_dir = plan.output_dir
    logits = lambda split: predict_logits(  # noqa: E731
        model, tokenizer, split.texts, max_length=plan.model.max_length,
        max_batch_tokens=plan.run.max_batch_tokens, description=f"scoring {split.name}",
        prompt_template=plan.model.prompt_template,
    )
    # Calibration and threshold are both fitted on the main source's validation rows (see
    # `Splits.calibration_rows`), the threshold on calibrated scores.
    validation_logits = logits(splits.validation)
    all_validation_margins = margins_of(validation_logits)
    calibration_rows = splits.calibration_rows
    validation = splits.validation.subset(calibration_rows)
    validation_margins = all_validation_margins[calibration_rows]
    calibration = fit_calibration(validation_margins, validation.labels, plan.run.calibration)
    # Every validation row's calibrated score (those without a binary label too: category rows under a contextual policy).
    all_validation_scores = calibration.probabilities(all_validation_margins)
    validation_scores = all_validation_scores[calibration_rows]
    try:
        threshold, threshold_rule = choose_threshold(
            validation.labels, validation_scores,
            target_precision=plan.run.threshold_for_precision, target_recall=plan.run.threshold_for_recall,
        )
    except ThresholdTargetError as error:
        raise ThresholdTargetError(
            f"{error}. The checkpoints are kept in {output_dir / 'checkpoints'}: a rerun with another target "
            f"resumes from the last one instead of training again"
        ) from None
    category_scores = lambda split_logits, unsafe: (  # noqa: E731 (as the classifier will report them)
        reported_category_scores(category_scores_of(split_logits), unsafe, plan.category_score_rule)
        if splits.schema.has_categories else None)
    validation_category_scores = category_scores(validation_logits, all_validation_scores)
    category_thresholds = route_threshold = category_report = None
    if splits.schema.has_categories:
        category_thresholds, route_threshold, category_report = evaluate_categories(
            splits, validation_category_scores, all_validation_scores, threshold,
            route_recall=plan.run.category_route_recall, contextual_categories=plan.data.contextual_categories)
    # What the classifier will answer: P(unsafe) >= threshold, or a category route where one is stored.
    verdicts = lambda unsafe, categories: unsafe_verdicts(unsafe, categories, threshold, route_threshold)  # noqa: E731
    all_validation_verdicts = verdicts(all_validation_scores, validation_category_scores)
    metrics = {"validation": split_metrics(validation, validation_margins, calibration, threshold,
                                           all_validation_verdicts[calibration_rows])}
    f1_interval = bootstrap_f1_interval(validation.labels, validation_scores, threshold, seed=plan.run.seed,
                                        predicted=all_validation_verdicts[calibration_rows])
    metrics["validation"]["f1_interval"] = list(f1_interval)
    response_threshold = None
    if splits.validation.sources is not None:
        labelled = splits.validation.binary_rows
        labelled_validation = splits.validation.subset(labelled)
        metrics["validation"].update(source_and_task_metrics(
            labelled_validation, all_validation_scores[labelled], threshold, all_validation_verdicts[labelled],
            splits.main_source))
        if splits.train.has_pairs:
            response_threshold, metrics["validation"]["responses"] = response_metrics(
                labelled_validation, all_validation_scores[labelled], all_validation_verdicts[labelled])
    if category_report is not None:
        metrics["validation"]["categories"] = category_report
    write_predictions(output_dir / "validation_predictions.csv", splits.validation, all_validation_scores,
                      validation_logits, splits.schema.codes, validation_category_scores)
    if splits.test is not None:
        test_logits = logits(splits.test)
        test_margins = margins_of(test_logits)
        test_scores = calibration.probabilities(test_margins)
        test_category_scores = category_scores(test_logits, test_scores)
        metrics["test"] = split_metrics(splits.test, test_margins, calibration, threshold,
                                        verdicts(test_scores, test_category_scores))
        if category_thresholds is not None:
            safe = splits.test.labels == 0
            metrics["test"].update(safe_row_alarms(test_scores[safe], test_category_scores[safe], threshold,
                                                   category_thresholds, route_threshold))
        write_predictions(output_dir / "test_predictions.csv", splits.test, test_scores,
                          test_logits, splits.schema.codes, test_category_scores)
    return Evaluation(metrics, calibration, threshold, threshold_rule, category_thresholds, route_threshold,
                      response_threshold)


def split_metrics(split: LabelledSplit, margins: np.ndarray, calibration: Calibration, threshold: float,
                  verdicts: np.ndarray | None = None) -> dict:
    """The metrics of calibrated scores at `threshold` (of `verdicts` where given: a category route),
    plus ECE and Brier of the uncalibrated softmax."""
    metrics = classification_metrics(split.labels, calibration.probabilities(margins), threshold, verdicts)
    raw = IDENTITY.probabilities(margins)
    metrics["uncalibrated"] = {"ece": expected_calibration_error(split.labels, raw),
                               "brier": brier_score(split.labels, raw)}
    return metrics


def source_metrics(validation: LabelledSplit, scores: np.ndarray, threshold: float, verdicts: np.ndarray,
                   main_source: str | None = None) -> dict:
    """The safe/unsafe metrics of each source's validation rows (those with a binary label), at
    the stored threshold (`verdicts`: the classifier's answers, a category route included), plus
    `unsafe_share`, `fpr` (the share of its own safe rows called unsafe; None without any) and
    `auprc`. A prompt source with no safe validation rows (most harm-prompt sets) has no AUPRC of
    its own: its rows are ranked against the main source's safe validation rows instead
    (`auprc_against` names that source), so that its AUPRC measures whether its harmful prompts
    score above the safe traffic the classifier is for; its recall is the other figure that counts."""
    labels, sources = validation.labels, validation.sources
    pairs = pair_mask(validation)
    metrics = {}
    for name, (ranked, against) in auprc_rows(labels, sources, pairs, main_source).items():
        rows = np.flatnonzero(sources == name)
        entry = classification_metrics(labels[rows], scores[rows], threshold, verdicts[rows])
        safe = rows[labels[rows] == 0]
        entry.update(unsafe_share=float(labels[rows].mean()), responses=bool(pairs[rows].any()),
                     fpr=float(verdicts[safe].mean()) if len(safe) else None)
        if against is not None:
            entry.update(auprc=float(average_precision_score(labels[ranked], scores[ranked])), auprc_against=against)
        metrics[str(name)] = entry
    return metrics


def auprc_rows(labels: np.ndarray, sources: np.ndarray, pairs: np.ndarray,
               main_source: str | None) -> dict[str, tuple[np.ndarray, str | None]]:
    """{source: (the rows its AUPRC ranks, the source it is ranked against or None)}: its own rows,
    or for a prompt source without safe rows, its rows beside the main source's safe prompt rows
    (`source_metrics`). `pairs`: a bool per row, True on (prompt, response) rows."""
    main_safe = np.flatnonzero((sources == main_source) & (labels == 0) & ~pairs)
    ranked = {}
    for name in dict.fromkeys(sources):
        rows = np.flatnonzero(sources == name)
        if not (labels[rows] == 0).any() and len(main_safe) and not pairs[rows].any():
            ranked[str(name)] = (np.concatenate([rows, main_safe]), main_source)
        else:
            ranked[str(name)] = (rows, None)
    return ranked


def pair_mask(split: LabelledSplit) -> np.ndarray:
    """A bool per row of `split`: True on (prompt, response) rows."""
    pairs = np.zeros(len(split), dtype=bool)
    pairs[split.pair_rows] = True
    return pairs


def source_auprcs(labels: np.ndarray, sources: np.ndarray, pairs: np.ndarray, scores: np.ndarray,
                  main_source: str | None) -> dict[str, float | None]:
    """{source: its AUPRC}, its rows ranked as `auprc_rows` says; None where they hold one class."""
    return {name: ranking_metric(average_precision_score, labels[ranked], scores[ranked])
            for name, (ranked, _) in auprc_rows(labels, sources, pairs, main_source).items()}


def prompt_source_auprcs(validation: LabelledSplit, scores: np.ndarray, main_source: str | None) -> dict[str, float]:
    """`source_auprcs` of the prompt sources that have one, over rows with a binary label (response
    sources are reported apart). Their mean is `source_macro_auprc`."""
    pairs = pair_mask(validation)
    answers = set(validation.sources[pairs])
    auprcs = source_auprcs(validation.labels, validation.sources, pairs, scores, main_source)
    return {name: value for name, value in auprcs.items() if value is not None and name not in answers}


def lookalike_safe_rows(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """The safe rows of the LOOKALIKE_SOURCES: their share called unsafe is the look-alike FPR."""
    return np.flatnonzero(np.isin(sources, LOOKALIKE_SOURCES) & (labels == 0))


def source_and_task_metrics(validation: LabelledSplit, scores: np.ndarray, threshold: float, verdicts: np.ndarray,
                            main_source: str | None) -> dict:
    """metrics.json's per-source entries (`source_metrics`), `source_macro_auprc` (their mean AUPRC
    over the prompt sources that have one; response sources are reported apart), and the look-alike
    FPR: the share of the safe rows of the LOOKALIKE_SOURCES present called unsafe, the false alarms
    on prompts that only look harmful (None where none of them is a source)."""
    sources = source_metrics(validation, scores, threshold, verdicts, main_source)
    auprcs = [entry["auprc"] for entry in sources.values() if entry["auprc"] is not None and not entry["responses"]]
    lookalike = lookalike_safe_rows(validation.labels, validation.sources)
    return {"sources": sources, "source_macro_auprc": float(np.mean(auprcs)) if auprcs else None,
            "lookalike_fpr": float(verdicts[lookalike].mean()) if len(lookalike) else None,
            "lookalike_n": int(len(lookalike)),
            "lookalike_sources": [name for name in LOOKALIKE_SOURCES if name in set(validation.sources)]}


def response_metrics(validation: LabelledSplit, scores: np.ndarray, verdicts: np.ndarray) -> tuple[float, dict]:
    """(response threshold, metrics of the response rows). The threshold maximises F1 of the
    calibrated scores on the response validation rows (the label judges the answer, a task whose
    base rate is not the main source's); the metrics are at it, and `at_decision_threshold` what the
    stored decision threshold (and any category route) answers, for the scoring paths that do not
    apply a response threshold. Generated refusals (`refusals.py`) are measured apart:
    `refusal_fpr`, the share of them judged unsafe at the response threshold."""
    rows = judged_response_rows(validation)
    labels, pair_scores = validation.labels[rows], scores[rows]
    threshold = f1_maximising_threshold(labels, pair_scores)
    metrics = classification_metrics(labels, pair_scores, threshold)
    alarms = lambda called: float(called[labels == 0].mean()) if (labels == 0).any() else None  # noqa: E731
    at_stored = classification_metrics(labels, pair_scores, threshold, verdicts[rows])
    refusals = np.flatnonzero(validation.sources == REFUSALS_SOURCE) if validation.sources is not None else []
    metrics.update(unsafe_share=float(labels.mean()), fpr=alarms(pair_scores >= threshold),
                   at_decision_threshold={key: at_stored[key] for key in ("precision", "recall", "f1")}
                   | {"fpr": alarms(np.asarray(verdicts[rows], dtype=bool))},
                   refusal_fpr=float((scores[refusals] >= threshold).mean()) if len(refusals) else None,
                   refusal_n=int(len(refusals)))
    return threshold, metrics


def describe_sources_and_tasks(validation: dict) -> list[str]:
    """The summary's lines of a run with several sources: a per-source table, the macro AUPRC and
    the look-alike FPR beside the main source's recall, and the response rows' metrics."""
    sources = validation.get("sources")
    if not sources:
        return []
    cell = lambda value, spec=".4f": "-" if value is None else format(value, spec)  # noqa: E731
    width = max(len(name) for name in sources) + 2
    lines = ["per source (validation rows with a label; recall and FPR at the stored threshold; *: no safe rows "
             "of its own, AUPRC against the main source's safe rows):",
             f"{'source':<{width}}{'n':>7}{'unsafe':>9}{'auprc':>9}{'recall':>9}{'fpr':>9}"]
    for name, entry in sources.items():
        lines.append(f"{name + (' *' if entry.get('auprc_against') else ''):<{width}}{entry['n']:>7d}"
                     f"{cell(entry['unsafe_share'], '.1%'):>9}{cell(entry['auprc']):>9}"
                     f"{cell(entry['recall'] if entry['unsafe_share'] > 0 else None):>9}{cell(entry['fpr']):>9}")
    lookalike = (f"look-alike FPR {cell(validation['lookalike_fpr'])} on {validation['lookalike_n']} safe rows of "
                 f"{', '.join(validation['lookalike_sources'])}" if validation.get("lookalike_n") else
                 "look-alike FPR - (no look-alike source)")
    lines.append(f"source macro AUPRC {cell(validation['source_macro_auprc'])}; {lookalike}; "
                 f"main source recall {cell(validation['recall'])}")
    responses = validation.get("responses")
    if responses:
        at_decision = responses["at_decision_threshold"]
        lines.append(f"responses ({responses['n']} validation pairs): AUPRC {cell(responses['auprc'])}, at the "
                     f"response threshold {responses['threshold']:.4f} F1 {responses['f1']:.4f}, recall "
                     f"{responses['recall']:.4f}, FPR {cell(responses['fpr'])} (at the decision threshold: F1 "
                     f"{at_decision['f1']:.4f}, FPR {cell(at_decision['fpr'])})")
        if responses.get("refusal_n"):
            lines.append(f"refusals ({responses['refusal_n']} validation pairs, wordings not trained on): judged "
                         f"unsafe at the response threshold {cell(responses['refusal_fpr'], '.1%')}")
    return lines


def evaluate_categories(splits: Splits, category_scores: np.ndarray, unsafe_scores: np.ndarray, threshold: float, *,
                        route_recall: float, contextual_categories: list[str]) -> tuple[np.ndarray, float | None, dict]:
    """Per-category thresholds (max F1) and metrics on the category sources' validation rows (those
    with a category); the category route's threshold (`categories.choose_route_threshold`, on the
    rows with a category outside `contextual_categories`; None where the decision threshold alone
    reaches `route_recall`, or it is 0); the verdict's recall on the category rows, overall, on the
    harmful ones and per category; and the category alarms on the main source's safe validation
    rows (`safe_row_alarms`)."""
    targets = splits.validation.categories
    rows = rows_with_a_category(targets)
    if not len(rows):
        raise DataError("the category sources left no validation rows; raise their validation= share")
    scores = category_scores[rows]
    thresholds = choose_category_thresholds(targets[rows], scores)
    metrics = category_metrics(splits.schema, targets[rows], scores, thresholds)
    harmful_codes = [index for index, code in enumerate(splits.schema.codes) if code not in contextual_categories]
    harmful = targets[rows][:, harmful_codes].max(axis=1) >= 1 if harmful_codes else np.zeros(len(rows), dtype=bool)
    binary = unsafe_scores[rows] >= threshold
    route = (choose_route_threshold(binary[harmful], scores[harmful].max(axis=1), route_recall)
             if route_recall > 0 and harmful.any() else None)
    calibration_rows = splits.calibration_rows
    safe = calibration_rows[splits.validation.labels[calibration_rows] == 0]
    metrics.update(safe_row_alarms(unsafe_scores[safe], category_scores[safe], threshold, thresholds, route))
    flagged = unsafe_verdicts(unsafe_scores[rows], scores, threshold, route)
    safe_flagged = unsafe_verdicts(unsafe_scores[safe], category_scores[safe], threshold, route)
    mean = lambda values: float(values.mean()) if len(values) else None  # noqa: E731
    metrics.update({"category_route_threshold": route, "binary_recall": mean(flagged),
                    "binary_recall_harmful": mean(flagged[harmful]), "safe_rows_unsafe": mean(safe_flagged)})
    if route is not None:
        metrics.update({"binary_recall_without_route": mean(binary),
                        "binary_recall_harmful_without_route": mean(binary[harmful]),
                        "safe_rows_unsafe_without_route": mean(unsafe_scores[safe] >= threshold)})
    metrics["binary_recall_per_category"] = {
        code: float(flagged[targets[rows, index] == 1].mean()) for index, code in enumerate(splits.schema.codes)
        if (targets[rows, index] == 1).any()
    }
    return thresholds, route, metrics


def write_predictions(path: Path, split: LabelledSplit, probabilities: np.ndarray, logits: np.ndarray | None = None,
                      category_codes: list[str] | None = None, category_scores: np.ndarray | None = None) -> None:
    """Per-row scores for curves and error analysis; rows are numbered as in the split (from 0).

    `unsafe_probability` is the calibrated P(unsafe), what `infer.py` answers; `uncalibrated_probability`
    (softmax[:, 1]) is kept beside it for reliability diagrams. With several sources, each row's
    `source`; with a category head, each row's category (`category`, empty where it has none) and
    each category's score as the classifier reports it (`score_S1`, ...).
    """
    columns = {"row": np.arange(len(split)), "label": split.labels, "unsafe_probability": probabilities}
    if logits is not None:
        columns["uncalibrated_probability"] = IDENTITY.probabilities(margins_of(logits))
    if split.sources is not None:
        columns["source"] = split.sources
    if category_codes:
        if split.categories is not None:
            columns["category"] = row_categories(split.categories, category_codes)
        for code, scores in zip(category_codes, category_scores.T):
            columns[f"score_{code}"] = scores
    pd.DataFrame(columns).to_csv(path, index=False, float_format="%.6g")
