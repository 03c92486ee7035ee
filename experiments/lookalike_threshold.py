"""What the stored decision threshold trades: false alarms on safe look-alikes against the main
source's recall, from a run's validation predictions.

    python experiments/lookalike_threshold.py runs/demo-lora
    python experiments/lookalike_threshold.py runs/demo-lora --thresholds 0.4,0.6,0.8 --target-fpr 0.05

The look-alike FPR is the share of the safe rows of the look-alike sources (`sources.LOOKALIKE_SOURCES`:
HateCheck's non-hateful cases, ToxiGen's neutral statements, CyberSecEval's benign requests,
Do-Not-Answer's harmless questions) that the classifier calls unsafe. A higher threshold lowers it,
and the main source's recall with it. For the stored threshold and each of `--thresholds`: the
look-alike FPR, each look-alike source's, and the main source's recall, precision and F1 of the
verdicts the classifier would give (`categories.unsafe_verdicts`; a stored category route kept at
its own threshold). `--target-fpr` adds the lowest threshold at which the look-alike FPR is at most
that. Validation rows only (`paired_bootstrap.ScoredRun` reads them); trains and scores nothing.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from paired_bootstrap import ScoredRun
from sklearn.metrics import f1_score, precision_score, recall_score

from safety_classifier.sources import LOOKALIKE_SOURCES


def threshold_row(run: ScoredRun, threshold: float) -> dict:
    """The look-alike FPR (overall and per source) and the main source's figures at `threshold`."""
    labels, sources = run.rows["label"].to_numpy(), run.rows["source"].to_numpy()
    verdicts = run.verdicts_at(threshold)
    safe_lookalike = np.isin(sources, LOOKALIKE_SOURCES) & (labels == 0)
    main = (sources == run.main_source) & ~run.pairs
    row = {"threshold": threshold, "lookalike_fpr": float(verdicts[safe_lookalike].mean()) if safe_lookalike.any() else None,
           "lookalike_n": int(safe_lookalike.sum())}
    row["by_source"] = {name: float(verdicts[safe_lookalike & (sources == name)].mean())
                        for name in LOOKALIKE_SOURCES if (safe_lookalike & (sources == name)).any()}
    for name, metric in (("recall", recall_score), ("precision", precision_score), ("f1", f1_score)):
        row[f"main_{name}"] = float(metric(labels[main], verdicts[main], zero_division=0))
    return row


def lowest_threshold_for(run: ScoredRun, target_fpr: float) -> float | None:
    """The lowest threshold whose look-alike FPR is at most `target_fpr` (the FPR only changes just
    above a safe look-alike row's score); None when none reaches it (the category route alone flags more)."""
    labels, sources = run.rows["label"].to_numpy(), run.rows["source"].to_numpy()
    safe_lookalike = np.isin(sources, LOOKALIKE_SOURCES) & (labels == 0)
    for threshold in np.nextafter(np.unique(run.scores[safe_lookalike]), np.inf):
        if run.verdicts_at(float(threshold))[safe_lookalike].mean() <= target_fpr:
            return float(threshold)
    return None


def table(rows: list[dict], stored: float) -> list[str]:
    names = list(dict.fromkeys(name for row in rows for name in row["by_source"]))
    lines = ["| Threshold | Look-alike FPR | " + " | ".join(f"{name} FPR" for name in names)
             + " | Main source: recall | precision | F1 |",
             "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|"]
    for row in rows:
        label = f"{row['threshold']:.3f}" + (" (stored)" if row["threshold"] == stored else "")
        by_source = " | ".join(f"{row['by_source'][name]:.3f}" if name in row["by_source"] else "-" for name in names)
        lines.append(f"| {label} | {row['lookalike_fpr']:.3f} | {by_source} | {row['main_recall']:.3f} "
                     f"| {row['main_precision']:.3f} | {row['main_f1']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a classifier trained with look-alike sources among its sources")
    parser.add_argument("--thresholds", default="0.4,0.5,0.6,0.7,0.8,0.9",
                        help="decision thresholds to compare with the stored one (comma-separated, in (0, 1])")
    parser.add_argument("--target-fpr", type=float, default=None,
                        help="also find the lowest threshold whose look-alike FPR is at most this")
    args = parser.parse_args(argv)
    try:
        thresholds = [float(value) for value in args.thresholds.split(",")]
    except ValueError:
        parser.error(f"--thresholds takes numbers separated by commas, not {args.thresholds!r}")
    if not all(0 < value <= 1 for value in thresholds):
        parser.error(f"--thresholds must lie in (0, 1], not {args.thresholds}")
    if args.target_fpr is not None and not 0 <= args.target_fpr < 1:
        parser.error(f"--target-fpr must lie in [0, 1), not {args.target_fpr}")
    run = ScoredRun.read(args.model_dir)
    stored = run.threshold
    rows = [threshold_row(run, value) for value in sorted({stored, *thresholds})]
    if rows[0]["lookalike_fpr"] is None:
        raise SystemExit(f"{args.model_dir}: no safe validation rows of a look-alike source "
                         f"({', '.join(LOOKALIKE_SOURCES)})")
    print(f"{run.name}: {rows[0]['lookalike_n']} safe look-alike validation rows; main source {run.main_source}\n")
    print("\n".join(table(rows, stored)))
    if args.target_fpr is not None:
        lowest = lowest_threshold_for(run, args.target_fpr)
        if lowest is None:
            print(f"\nno threshold brings the look-alike FPR to {args.target_fpr:g}: the category route alone flags more")
        else:
            lowest = math.ceil(lowest * 1000) / 1000  # rounded up: the printed threshold keeps the FPR within the target
            row = threshold_row(run, lowest)
            print(f"\nlook-alike FPR <= {args.target_fpr:g} from a threshold of {lowest:.3f}: FPR {row['lookalike_fpr']:.3f}, "
                  f"main source recall {row['main_recall']:.3f}, precision {row['main_precision']:.3f}, "
                  f"F1 {row['main_f1']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
