"""What a category head could add to the safe/unsafe decision, from a run's validation predictions.

    python experiments/category_route.py runs/unl-neg
    python experiments/category_route.py runs/unl-neg --harm-thresholds 0.2,0.1,0.07,0.05
    python experiments/category_route.py runs/unl-neg --split test --harm-thresholds 0.07
    python experiments/category_route.py runs/unl-neg --target-recall 0.9

For a classifier trained with `--category-rows-binary unlabelled --safe-rows-category-negatives`
(the binary head learns the main source alone, the category head learns the category rows and
that the main source's safe rows have no category), it asks on the validation split only: if a
prompt were also called unsafe whenever a category score reaches a threshold, how many category
prompts would the decision catch, and how many more safe prompts of the main source would it
flag? Rules compared: the binary verdict alone; or any category at its own stored threshold; or
the largest category score at each of `--harm-thresholds`. The binary head's ranking (the main
source's AUPRC) is the same under every rule. Thresholds are looked at on validation; `--split
test` (the main source's test file: no category rows) reports a threshold chosen there. A
threshold chosen on the same category rows it is judged on flatters it: `--target-recall R`
chooses, on each half of the category rows (two seeded folds, stratified by category), the
highest threshold that reaches recall R there (as training chooses `--category-route-recall`'s),
and reports the recall it gets on the other half.
Reads `<split>_predictions.csv` and `safety_classifier.json`; trains and scores nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, f1_score
from sklearn.model_selection import StratifiedKFold

from safety_classifier.categories import category_score_rule_of, choose_route_threshold


@dataclass
class RoutePredictions:
    """A prediction file's columns as the rules need them."""

    category_scores: np.ndarray  # rows x categories, as the classifier reports them
    binary_unsafe: np.ndarray  # the binary verdict at the stored threshold
    labels: np.ndarray
    main_source: np.ndarray  # rows of the main source with a binary label
    categories: np.ndarray  # each row's category code, "" where it has none

    @classmethod
    def read(cls, predictions: pd.DataFrame, metadata: dict) -> RoutePredictions:
        codes = [category["code"] for category in metadata["categories"]]
        labels = predictions["label"].to_numpy()
        # A test file is the main source's alone, and its predictions have no `source` column.
        main = (predictions["source"] == metadata["main_source"]).to_numpy() if "source" in predictions \
            else np.ones(len(predictions), dtype=bool)
        categories = (predictions["category"].astype(str).to_numpy() if "category" in predictions
                      else np.full(len(predictions), "", dtype=object))
        return cls(predictions[[f"score_{code}" for code in codes]].to_numpy(),
                   predictions["unsafe_probability"].to_numpy() >= metadata["threshold"],
                   labels, main & (labels >= 0), categories)


def route_table(read: RoutePredictions, metadata: dict, harm_thresholds: list[float]) -> list[dict]:
    scores, binary, labels, main = read.category_scores, read.binary_unsafe, read.labels, read.main_source
    category_rows = read.categories != ""
    category_thresholds = np.array([category["threshold"] for category in metadata["categories"]])
    rules = {"the binary verdict alone": binary,
             "or any category at its own threshold": binary | (scores >= category_thresholds).any(axis=1)}
    for threshold in harm_thresholds:
        rules[f"or the largest category score >= {threshold:g}"] = binary | (scores.max(axis=1) >= threshold)
    return [{
        "rule": name,
        "recall_on_category_rows": float(unsafe[category_rows].mean()) if category_rows.any() else None,
        "main_source_safe_rows_flagged": float(unsafe[main & (labels == 0)].mean()),
        "main_source_recall": float(unsafe[main & (labels == 1)].mean()),
        "main_source_f1": float(f1_score(labels[main], unsafe[main])),
    } for name, unsafe in rules.items()]


def cross_fitted_route(read: RoutePredictions, target_recall: float, seed: int = 42) -> list[dict]:
    """Per fold of the category rows: the threshold chosen on the other fold for `target_recall`
    (`categories.choose_route_threshold`, as training chooses it; None: the binary verdict alone
    reaches it there), the recall it reaches on this one, and the main source's safe rows it flags."""
    largest, binary = read.category_scores.max(axis=1), read.binary_unsafe
    safe_main = read.main_source & (read.labels == 0)
    rows = np.flatnonzero(read.categories != "")
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(rows, read.categories[rows])
    results = []
    for chosen_on, judged_on in folds:
        chosen, judged = rows[chosen_on], rows[judged_on]
        threshold = choose_route_threshold(binary[chosen], largest[chosen], target_recall)
        unsafe = binary if threshold is None else binary | (largest >= threshold)
        results.append({"threshold": threshold, "recall_where_chosen": float(unsafe[chosen].mean()),
                        "recall_on_the_other_half": float(unsafe[judged].mean()),
                        "main_source_safe_rows_flagged": float(unsafe[safe_main].mean())})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a classifier directory with a category head")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--target-recall", type=float, default=None,
                        help="also choose the threshold for this recall on one half of the category rows, "
                             "judged on the other")
    parser.add_argument("--harm-thresholds", default="0.3,0.2,0.1,0.07,0.05",
                        help="thresholds of the largest category score to compare (comma-separated)")
    args = parser.parse_args()
    metadata = json.loads((args.model_dir / "safety_classifier.json").read_text())
    if not metadata.get("categories"):
        raise SystemExit(f"error: {args.model_dir} has no category head")
    rule = category_score_rule_of(metadata)  # a directory saved before the rule was stored is "conditional"
    if rule != "conditional":
        raise SystemExit(f"error: {args.model_dir}'s category scores are {rule!r}, not the bare sigmoids of a "
                         "head trained with --safe-rows-category-negatives")
    predictions = pd.read_csv(args.model_dir / f"{args.split}_predictions.csv", keep_default_na=False)
    # The main source is --train-file's, named by its stem as training names it (sources.py).
    metadata["main_source"] = Path(metadata["training_arguments"]["train_file"]).stem
    read = RoutePredictions.read(predictions, metadata)
    main_rows = read.main_source
    auprc = average_precision_score(read.labels[main_rows], predictions["unsafe_probability"].to_numpy()[main_rows])
    rows = route_table(read, metadata, [float(value) for value in args.harm_thresholds.split(",")])
    print(f"{metadata['main_source']} {args.split} AUPRC (binary head, every rule): {auprc:.3f}\n")
    print("| Decision | Recall on category rows | Main source: safe rows flagged | Main source: recall | Main source: F1 |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        recall = row["recall_on_category_rows"]
        print(f"| {row['rule']} | {'-' if recall is None else f'{recall:.3f}'} "
              f"| {row['main_source_safe_rows_flagged']:.1%} "
              f"| {row['main_source_recall']:.3f} | {row['main_source_f1']:.3f} |")
    folds = None
    if args.target_recall is not None:
        folds = cross_fitted_route(read, args.target_recall)
        print(f"\nChosen on one half of the category rows for recall >= {args.target_recall:g}, judged on the other:\n")
        print("| Fold | Threshold | Recall where chosen | Recall on the other half | Main source: safe rows flagged |")
        print("|---|---:|---:|---:|---:|")
        for number, fold in enumerate(folds, 1):
            threshold = "none" if fold["threshold"] is None else f"{fold['threshold']:.3f}"
            print(f"| {number} | {threshold} | {fold['recall_where_chosen']:.3f} "
                  f"| {fold['recall_on_the_other_half']:.3f} | {fold['main_source_safe_rows_flagged']:.1%} |")
    print(json.dumps({"model_dir": str(args.model_dir), "split": args.split, "main_source_auprc": auprc,
                      "rules": rows, "cross_fitted": folds}))


if __name__ == "__main__":
    main()
