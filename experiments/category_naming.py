"""Which categories an unsafe verdict names, from a run's validation predictions.

    python experiments/category_naming.py runs/demo-lora runs/model-lora

Each category has its own threshold (the F1-best one on the categorised validation rows); named by
those alone, an unsafe text can come out with no category at all. The rules compared, on the
categorised validation rows (every one harmful): `thresholds` (the classifier's rule until
2026-12-04); `thresholds + top` (its rule since, `categories.name_categories`: also the
highest-scoring category where none reaches its threshold); `top` (the highest-scoring category
alone). The thresholds are chosen on one half of the rows (each category's rows dealt to the
halves in turn, in a seeded order: `categories.out_of_fold_names`) and judged on the other, so that no
rule is flattered by thresholds fitted on the rows it is judged on. The tables: the category macro
F1 pooled over both halves, the mean over `--repeats` seeded pairs of halves (as training's
metrics); the share of rows left without a category; and, per source, how often the top-scored
category is the row's.
Reads `validation_predictions.csv`; trains and scores nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from safety_classifier.categories import macro_f1, name_categories, out_of_fold_names


def top_category(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(rows x categories): each row's highest-scoring category alone."""
    top = np.zeros(scores.shape, dtype=bool)
    top[np.arange(len(scores)), scores.argmax(axis=1)] = True
    return top


# rule -> what it names from (scores, thresholds); "thresholds + top" is the classifier's own.
RULES = {
    "thresholds": lambda scores, thresholds: scores >= thresholds[None, :],
    "thresholds + top": name_categories,
    "top": top_category,
}


def categorised_rows(run_dir: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A run's categorised validation rows, their (rows x categories) targets and scores."""
    predictions = pd.read_csv(run_dir / "validation_predictions.csv", keep_default_na=False)
    codes = [column.removeprefix("score_") for column in predictions.columns if column.startswith("score_")]
    if not codes:
        raise SystemExit(f"{run_dir}: no category scores in validation_predictions.csv (a binary classifier)")
    rows = predictions[predictions["category"] != ""]
    targets = np.stack([(rows["category"] == code).to_numpy() for code in codes], axis=1).astype(np.int64)
    return rows, targets, rows[[f"score_{code}" for code in codes]].to_numpy(dtype=np.float64)


def top_category_right_per_source(run_dir: Path, rows: pd.DataFrame, targets: np.ndarray, scores: np.ndarray) -> pd.Series:
    """Per source, the share of its categorised validation rows whose top-scored category is theirs."""
    right = targets[np.arange(len(rows)), scores.argmax(axis=1)] == 1
    return pd.Series(right, index=rows["source"].to_numpy()).groupby(level=0).mean().rename(str(run_dir))


def run_rows(run_dir: Path, targets: np.ndarray, scores: np.ndarray, repeats: int) -> list[dict]:
    table = []
    for rule, namer in RULES.items():
        named = [out_of_fold_names(targets, scores, seed, namer) for seed in range(repeats)]
        table.append({"run": str(run_dir), "rule": rule,
                      "macro_f1": float(np.mean([macro_f1(targets, each) for each in named])),
                      "without_category": float(np.mean([(~each.any(axis=1)).mean() for each in named])),
                      "rows": len(targets)})
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with validation_predictions.csv")
    parser.add_argument("--repeats", type=int, default=10, help="seeded pairs of halves (training's metrics: 10)")
    args = parser.parse_args(argv)
    runs = {run: categorised_rows(run) for run in args.runs}
    table = pd.DataFrame([row for run, (_, targets, scores) in runs.items()
                          for row in run_rows(run, targets, scores, args.repeats)])
    wide = table.pivot(index="run", columns="rule", values="macro_f1")[list(RULES)]
    wide.loc["mean"] = wide.mean()
    print(f"category macro F1, thresholds from the other half, mean of {args.repeats} pairs of halves "
          f"({table['rows'].iloc[0]} rows a run):")
    print(wide.round(3).to_string())
    print("\nshare of rows without a category:")
    print(table.pivot(index="run", columns="rule", values="without_category")[list(RULES)].round(3).to_string())
    print("\ntop-scored category right, per source:")
    print(pd.concat([top_category_right_per_source(run, *loaded) for run, loaded in runs.items()], axis=1)
          .T.round(3).to_string())


if __name__ == "__main__":
    main()
