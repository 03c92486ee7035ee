"""The verdict's recall on the category validation rows, for any classifier, binary ones too.

    python experiments/category_recall.py runs/comparison/lora-r16 runs/comparison/lora-r16-categories

Holds out the AILuminate prompts a category run holds out (the results table's split: the same
source spec and seed, `safety_classifier.sources.ailuminate_source_spec`), scores them with each
classifier as `infer.py` would (its stored thresholds, a category route included), and prints
the share called unsafe: over all of them, and over those outside the contextual categories (S5),
which the categories issue's recall goal counts. A classifier trained on ToxicChat alone never
saw these prompts; one trained with the category file saw the other 75 % of them. Scores nothing
else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from compare_methods import AILUMINATE_FILE, DATA_DIR, SEED

from safety_classifier.categories import row_categories, rows_with_a_category
from safety_classifier.console import quiet_library_noise
from safety_classifier.data import LabelledSplit, load_splits
from safety_classifier.inference import load_classifier
from safety_classifier.labels import CONTEXTUAL_CATEGORIES
from safety_classifier.sources import add_sources, ailuminate_source_spec


def held_out_category_rows(data_dir: Path, seed: int = SEED,
                           validation_fraction: float = 0.1) -> tuple[LabelledSplit, list[str]]:
    """The category validation rows of a run on `data_dir`'s ToxicChat training file plus the
    AILuminate file, and each row's category code."""
    train_file = data_dir / "toxicchat0124_train.csv"
    splits = load_splits(train_file=str(train_file), validation_file=None, test_file=None, text_column="user_input",
                         label_column="toxicity", validation_fraction=validation_fraction, seed=seed)
    spec = ailuminate_source_spec(str(data_dir.parent / AILUMINATE_FILE))
    splits, schema = add_sources(splits, train_file.stem, [spec], seed=seed, validation_fraction=validation_fraction)
    validation = splits.validation
    rows = rows_with_a_category(validation.categories)
    return validation.subset(rows), row_categories(validation.categories[rows], schema.codes)


def category_recall(model_dir: Path, rows: LabelledSplit, codes: list[str], **load_options) -> dict:
    """The share of `rows` the classifier in `model_dir` calls unsafe, overall and outside S5."""
    classifier = load_classifier(model_dir, **load_options)
    unsafe = classifier.unsafe(classifier.scores(rows.texts, show_progress=False))
    harmful = np.array([code not in CONTEXTUAL_CATEGORIES for code in codes])
    return {"model_dir": str(model_dir), "rows": len(codes), "recall": float(unsafe.mean()),
            "rows_outside_s5": int(harmful.sum()), "recall_outside_s5": float(unsafe[harmful].mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dirs", nargs="+", type=Path, help="classifier directories")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the ToxicChat directory (AILuminate beside it)")
    parser.add_argument("--seed", type=int, default=SEED, help="the runs' --seed, which draws the split")
    args = parser.parse_args(argv)
    quiet_library_noise()
    rows, codes = held_out_category_rows(args.data_dir, args.seed)
    results = [category_recall(model_dir, rows, codes) for model_dir in args.model_dirs]
    print(f"{len(codes)} held-out AILuminate prompts, {results[0]['rows_outside_s5']} outside S5\n")
    print("| Classifier | Called unsafe: all | outside S5 |\n|---|---:|---:|")
    for result in results:
        print(f"| {result['model_dir']} | {result['recall']:.3f} | {result['recall_outside_s5']:.3f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
