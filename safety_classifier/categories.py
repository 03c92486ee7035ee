"""The category head's loss, its per-category thresholds and its metrics.

Each category is its own sigmoid output (`labels.py` says why), trained by binary cross-entropy
on the rows that carry category targets; each gets its own decision threshold, the one with the
best F1 on the category validation rows, because categories differ in how well they separate
(a single 0.5 would under-flag the hard ones and over-flag the easy ones).

What a category score means depends on what the head saw. Trained on category rows alone (all of
them harmful prompts), its sigmoid is P(category | the prompt is harmful): on ordinary traffic it is
arbitrary, and a client reading `category_scores` alone (as OpenAI's moderation clients do) would
see alarms on most safe prompts. So such a classifier reports the "joint" score, that
sigmoid times the calibrated P(unsafe): P(harmful and of this category). A head also taught that
safe rows have no category (`--safe-rows-category-negatives`) already scores safe traffic low and
reports its sigmoid as it is ("conditional"), as do directories saved before the rule was stored.

The category head can also be a second route to "unsafe": a text is unsafe when P(unsafe) reaches
the decision threshold or its largest category score reaches the route threshold. Training stores
one (`category_route_threshold`) only where the binary decision alone misses harmful category rows
(`choose_route_threshold`): a binary head trained on the main source alone learns that source's
notion of unsafe, not the categories'.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, confusion_matrix

from .calibration import f1_maximising_threshold
from .errors import ModelLoadError
from .labels import MISSING_TARGET, LabelSchema
from .metrics import ranking_metric

CATEGORY_SCORE_RULES = ("joint", "conditional")
LEGACY_CATEGORY_SCORE_RULE = "conditional"


def category_score_rule_of(metadata: dict) -> str:
    """The stored rule (`safety_classifier.json`'s `category_score_rule`); none stored: conditional."""
    rule = metadata.get("category_score_rule", LEGACY_CATEGORY_SCORE_RULE)
    if rule not in CATEGORY_SCORE_RULES:
        raise ModelLoadError(f"category_score_rule {rule!r} is not one of {', '.join(CATEGORY_SCORE_RULES)}")
    return rule


def category_route_threshold_of(metadata: dict) -> float | None:
    """The stored route threshold (`category_route_threshold`); None: no route (and before it existed)."""
    value = metadata.get("category_route_threshold")
    if value is None:
        return None
    if not metadata.get("categories"):
        raise ModelLoadError("category_route_threshold is stored without a category head")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ModelLoadError(f"category_route_threshold must be a number in [0, 1], not {value!r}")
    return float(value)


def reported_category_scores(category_probabilities: np.ndarray, unsafe_probabilities: np.ndarray,
                             rule: str) -> np.ndarray:
    """(rows x categories) scores as the classifier reports them: the head's sigmoids, times the
    calibrated P(unsafe) under the "joint" rule (see the module's doc)."""
    if rule == "joint":
        return category_probabilities * np.asarray(unsafe_probabilities)[:, None]
    return category_probabilities


def unsafe_verdicts(unsafe_probabilities: np.ndarray, category_scores: np.ndarray | None, threshold: float,
                    route_threshold: float | None = None) -> np.ndarray:
    """Per row, the classifier's verdict: P(unsafe) at or over `threshold`, or (with a route) the
    largest category score at or over `route_threshold`."""
    unsafe = np.asarray(unsafe_probabilities) >= threshold
    if route_threshold is not None and category_scores is not None and np.size(category_scores):
        unsafe = unsafe | (np.asarray(category_scores).max(axis=1) >= route_threshold)
    return unsafe


def name_categories(category_scores: np.ndarray, category_thresholds: np.ndarray,
                    route_threshold: float | None = None) -> np.ndarray:
    """(rows x categories): the categories a text would name if judged unsafe: each whose score
    reaches its own threshold; where none does, the highest-scoring one; and where the largest score
    reaches the route threshold, that category too (the one that made the text unsafe). The per-category
    thresholds, fitted on a few dozen rows each, judge unseen rows worse than the top score does
    (`experiments/category_naming.py`, docs/categories.md)."""
    scores = np.asarray(category_scores)
    named = scores >= np.asarray(category_thresholds)[None, :]
    if scores.size:
        named_by_top = ~named.any(axis=1)
        if route_threshold is not None:
            named_by_top |= scores.max(axis=1) >= route_threshold
        rows = np.flatnonzero(named_by_top)
        named[rows, scores[rows].argmax(axis=1)] = True
    return named


def flagged_categories(unsafe_probabilities: np.ndarray, category_scores: np.ndarray, threshold: float,
                       category_thresholds: np.ndarray, route_threshold: float | None = None) -> np.ndarray:
    """(rows x categories): what `name_categories` names, on the rows whose verdict is unsafe; a safe
    verdict never names a harm, and an unsafe one always names at least one, as the OpenAI
    moderation API's `flagged` implies."""
    unsafe = unsafe_verdicts(unsafe_probabilities, category_scores, threshold, route_threshold)
    return unsafe[:, None] & name_categories(category_scores, category_thresholds, route_threshold)


def safe_row_alarms(unsafe_probabilities: np.ndarray, category_scores: np.ndarray, threshold: float,
                    category_thresholds: np.ndarray, route_threshold: float | None = None) -> dict:
    """On rows labelled safe (pass only those): the share with some category score at or over its
    threshold (what a client reading `category_scores` alone would see), and the share flagged with
    a category (`flagged_categories`, what `infer.py` and `serve.py` report)."""
    over = (np.asarray(category_scores) >= np.asarray(category_thresholds)[None, :]).any(axis=1)
    flagged = flagged_categories(unsafe_probabilities, category_scores, threshold, category_thresholds,
                                 route_threshold).any(axis=1)
    n = len(over)
    return {"safe_rows_category_score_over_threshold": float(over.mean()) if n else None,
            "safe_rows_flagged_with_a_category": float(flagged.mean()) if n else None, "safe_rows_n": int(n)}


def choose_route_threshold(binary_unsafe: np.ndarray, largest_category_scores: np.ndarray,
                           target_recall: float) -> float | None:
    """On harmful rows (pass only those): a threshold h of the largest category score at which
    `binary_unsafe | (largest >= h)` reaches `target_recall` while flagging as few other texts as it
    can; None where the binary verdict alone reaches it (no route needed).

    The highest such h is the score of the last row needed, so that row would sit on the line and
    fall either side of it as half-precision scores move with their batch: h is instead half-way,
    in log-odds, between that score and the next lower missed one (the same rows reach it)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"a route's target recall must be in (0, 1], not {target_recall}")
    binary_unsafe = np.asarray(binary_unsafe, dtype=bool)
    needed = math.ceil(target_recall * len(binary_unsafe) - 1e-9) - int(binary_unsafe.sum())
    if needed <= 0:
        return None
    missed = np.sort(np.asarray(largest_category_scores, dtype=np.float64)[~binary_unsafe])[::-1]
    if needed == len(missed):
        return float(missed[-1])
    last_needed, next_lower = np.clip(missed[[needed - 1, needed]], 1e-12, 1 - 1e-12)
    log_odds = (math.log(last_needed / (1 - last_needed)) + math.log(next_lower / (1 - next_lower))) / 2
    return 1 / (1 + math.exp(-log_odds))


def category_loss_sum(category_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows with category targets of the mean binary cross-entropy over categories;
    rows whose targets are MISSING_TARGET add nothing."""
    labelled = targets[:, 0] != MISSING_TARGET
    if not labelled.any():
        return category_logits.sum() * 0.0  # keeps the graph (DDP needs every output used)
    losses = F.binary_cross_entropy_with_logits(category_logits[labelled].float(), targets[labelled].float(),
                                                reduction="none")
    return losses.mean(dim=1).sum()


def category_rows(targets: np.ndarray) -> np.ndarray:
    """Rows that carry category targets (a safe row taught "no category" among them)."""
    return np.flatnonzero(targets[:, 0] != MISSING_TARGET) if targets.size else np.zeros(0, dtype=np.int64)


def rows_with_a_category(targets: np.ndarray) -> np.ndarray:
    """Rows labelled with at least one category (the category sources' rows)."""
    return np.flatnonzero(targets.max(axis=1) >= 1) if targets.size else np.zeros(0, dtype=np.int64)


def row_categories(targets: np.ndarray, codes: list[str]) -> list[str]:
    """Each row's category code (its first, where it has several); "" for a row without one."""
    return [codes[int(np.argmax(row))] if row.max() >= 1 else "" for row in targets]


def choose_category_thresholds(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per category, the F1-maximising threshold on the labelled rows; 0.5 where a category has
    no positive (or no negative) validation row to choose by."""
    thresholds = np.full(targets.shape[1], 0.5)
    for index in range(targets.shape[1]):
        column = targets[:, index]
        if 0 < column.sum() < len(column):
            thresholds[index] = f1_maximising_threshold(column, scores[:, index])
    return thresholds


def category_folds(targets: np.ndarray, seed: int = 0) -> np.ndarray:
    """0 or 1 per row: two halves, each category's rows (by a row's first category) dealt to them in
    turn, in a seeded order."""
    order = np.random.default_rng(seed).permutation(len(targets))
    first = np.asarray(targets)[order].argmax(axis=1)
    folds = np.empty(len(targets), dtype=np.int64)
    for category in np.unique(first):
        members = order[first == category]
        folds[members] = np.arange(len(members)) % 2
    return folds


def macro_f1(targets: np.ndarray, named: np.ndarray) -> float:
    """The mean over categories of F1 (0 for a category never named rightly), as `category_metrics`'s."""
    truth = np.asarray(targets).astype(bool)
    return float(np.mean([_prf(truth[:, index], named[:, index])[2] for index in range(truth.shape[1])]))


def out_of_fold_names(targets: np.ndarray, scores: np.ndarray, seed: int,
                      namer: Callable[[np.ndarray, np.ndarray], np.ndarray] = name_categories) -> np.ndarray:
    """(rows x categories): what `namer(scores, thresholds)` names, each half of the rows
    (`category_folds`) with the thresholds chosen on the other half."""
    folds = category_folds(targets, seed)
    named = np.zeros(targets.shape, dtype=bool)
    for fold in (0, 1):
        judged = folds == fold
        thresholds = choose_category_thresholds(targets[~judged], scores[~judged])
        named[judged] = namer(scores[judged], thresholds)
    return named


def out_of_fold_named_macro_f1(targets: np.ndarray, scores: np.ndarray, repeats: int = 10) -> float:
    """Category macro F1 of what `name_categories` names, each half of the rows judged with the
    thresholds chosen on the other half (thresholds fitted on the rows they are judged on flatter
    them: docs/categories.md, *Naming the harm*); the mean over `repeats` seeded pairs of halves."""
    targets, scores = np.asarray(targets), np.asarray(scores)
    return float(np.mean([macro_f1(targets, out_of_fold_names(targets, scores, seed)) for seed in range(repeats)]))


def _prf(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    true_positive = float(np.sum(truth & predicted))
    precision = true_positive / predicted.sum() if predicted.sum() else 0.0
    recall = true_positive / truth.sum() if truth.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def category_metrics(schema: LabelSchema, targets: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> dict:
    """Per category: precision, recall, F1 at its threshold and AUPRC; their macro average; and the
    confusion between categories of single-category rows (true category x highest-scoring one)."""
    truth = targets.astype(bool)
    predicted = scores >= thresholds[None, :]
    per_category = {}
    for index, category in enumerate(schema.categories):
        precision, recall, f1 = _prf(truth[:, index], predicted[:, index])
        per_category[category.code] = {
            "name": category.name, "precision": precision, "recall": recall, "f1": f1,
            "auprc": ranking_metric(average_precision_score, truth[:, index].astype(np.int64), scores[:, index]),
            "threshold": float(thresholds[index]), "n_positive": int(truth[:, index].sum()),
        }
    macro = {key: float(np.mean([entry[key] for entry in per_category.values() if entry[key] is not None]))
             for key in ("precision", "recall", "f1", "auprc")}
    single = truth.sum(axis=1) == 1
    confusion = confusion_matrix(truth[single].argmax(axis=1), scores[single].argmax(axis=1),
                                 labels=np.arange(len(schema.categories)))
    return {
        "n": int(len(targets)),
        "per_category": per_category,
        "macro": macro,
        "top1_accuracy": float(np.trace(confusion) / confusion.sum()) if confusion.sum() else None,
        "named_macro_f1_out_of_fold": out_of_fold_named_macro_f1(targets, scores),
        "confusion": {"labels": schema.codes, "rows_true_columns_top_scored": confusion.tolist()},
    }


def format_category_table(metrics: dict) -> str:
    lines = [f"{'category':<34}{'precision':>10}{'recall':>8}{'F1':>8}{'AUPRC':>8}{'thr':>8}{'n':>5}"]
    for code, entry in metrics["per_category"].items():
        auprc = f"{entry['auprc']:.4f}" if entry["auprc"] is not None else "-"
        lines.append(f"{code + ' ' + entry['name']:<34.34}{entry['precision']:>10.4f}{entry['recall']:>8.4f}"
                     f"{entry['f1']:>8.4f}{auprc:>8}{entry['threshold']:>8.3f}{entry['n_positive']:>5}")
    macro = metrics["macro"]
    lines.append(f"{'macro average':<34}{macro['precision']:>10.4f}{macro['recall']:>8.4f}{macro['f1']:>8.4f}"
                 f"{macro['auprc']:>8.4f}")
    if metrics.get("named_macro_f1_out_of_fold") is not None:
        lines.append(f"{'macro F1 as named, thresholds from the other half':<52}"
                     f"{metrics['named_macro_f1_out_of_fold']:>8.4f}")
    return "\n".join(lines)
