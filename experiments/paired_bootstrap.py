"""Is run B better than run A on validation, or within the noise of its few rows? A paired bootstrap.

    python experiments/paired_bootstrap.py runs/comparison/lora-r16-top8-all-sources runs/exp-top8-1epoch
    python experiments/paired_bootstrap.py A B --resamples 2000 --json results/paired/a-vs-b.json

A and B are saved classifiers trained with the same seed and sources, so that they scored the same
validation rows (each source's split is drawn with a fixed seed; the rows are checked). Each draw
resamples every source's validation rows with replacement, the same draw for both runs, and
recomputes each figure as `evaluation.py` reports it: every source's AUPRC (a source without safe
rows ranked against the main source's safe rows), their mean over the prompt sources, and the
look-alike FPR at each run's own stored threshold. The table gives B - A on the rows themselves and
its 95 % percentile interval; `*` marks an interval without 0. An interval that holds 0 is a
difference these rows cannot tell from chance, and a second training seed's noise comes on top.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from safety_classifier.calibration import BOOTSTRAP_RESAMPLES, percentile_interval
from safety_classifier.categories import unsafe_verdicts
from safety_classifier.evaluation import lookalike_safe_rows, source_auprcs

MACRO = "mean AUPRC over prompt sources"
LOOKALIKE = "look-alike FPR"


@dataclass
class ScoredRun:
    """One run's labelled validation rows: labels, sources, which rows are answers, its scores and
    verdicts (at its stored threshold; `verdicts_at` another)."""

    name: str
    rows: pd.DataFrame  # row, label, source of each labelled validation row
    pairs: np.ndarray
    scores: np.ndarray
    main_source: str
    threshold: float  # the stored decision threshold
    category_scores: np.ndarray | None = None
    route_threshold: float | None = None

    @cached_property
    def verdicts(self) -> np.ndarray:
        return self.verdicts_at(self.threshold)

    def verdicts_at(self, threshold: float) -> np.ndarray:
        """The classifier's verdicts with the decision threshold at `threshold` (the category route, where
        one is stored, kept at its own). The stored thresholds are validation scores, which the prediction
        file keeps to 6 significant digits: such a score may read just below its threshold."""
        rounding = 1e-6
        return unsafe_verdicts(self.scores, self.category_scores,
                               threshold - rounding if threshold == self.threshold else threshold,
                               None if self.route_threshold is None else self.route_threshold - rounding)

    @classmethod
    def read(cls, run_dir: Path) -> ScoredRun:
        files = {name: run_dir / name for name in ("validation_predictions.csv", "safety_classifier.json", "metrics.json")}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise SystemExit(f"{run_dir}: not a finished training run ({', '.join(missing)} missing)")
        predictions = pd.read_csv(files["validation_predictions.csv"])
        if "source" not in predictions:
            raise SystemExit(f"{run_dir}: its validation rows come from one source; this compares runs over several")
        metadata = json.loads(files["safety_classifier.json"].read_text())
        train_file = metadata.get("training_arguments", {}).get("train_file")
        if not train_file:
            raise SystemExit(f"{run_dir}: trained without a --train-file, so its main source is not known")
        sources = json.loads(files["metrics.json"].read_text())["validation"].get("sources", {})
        predictions = predictions[predictions["label"] >= 0].reset_index(drop=True)
        codes = [category["code"] for category in metadata.get("categories") or []]
        category_scores = predictions[[f"score_{code}" for code in codes]].to_numpy() if codes else None
        answers = [name for name, entry in sources.items() if entry.get("responses")]
        return cls(run_dir.name, predictions[["row", "label", "source"]],
                   predictions["source"].isin(answers).to_numpy(), predictions["unsafe_probability"].to_numpy(),
                   Path(train_file).stem, float(metadata["threshold"]), category_scores,
                   metadata.get("category_route_threshold"))

    def figures(self, draw: np.ndarray) -> dict[str, float | None]:
        """Every figure on the rows `draw` picks (indices, repeats allowed)."""
        labels = self.rows["label"].to_numpy()[draw]
        sources = self.rows["source"].to_numpy()[draw]
        pairs, scores = self.pairs[draw], self.scores[draw]
        auprcs = source_auprcs(labels, sources, pairs, scores, self.main_source)
        answer_sources = set(sources[pairs])
        prompt_auprcs = [value for name, value in auprcs.items() if value is not None and name not in answer_sources]
        figures: dict[str, float | None] = {f"{name} AUPRC": value for name, value in auprcs.items()}
        figures[MACRO] = float(np.mean(prompt_auprcs)) if prompt_auprcs else None
        lookalike = lookalike_safe_rows(labels, sources)
        figures[LOOKALIKE] = float(self.verdicts[draw][lookalike].mean()) if len(lookalike) else None
        return figures


def check_same_rows(a: ScoredRun, b: ScoredRun) -> None:
    if not a.rows.equals(b.rows):
        raise SystemExit(f"{a.name} and {b.name} scored different validation rows: compare runs trained with the "
                         "same seed and sources")


def paired_bootstrap(a: ScoredRun, b: ScoredRun, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     confidence: float = 0.95) -> list[dict]:
    """One entry a figure: A's and B's values on the rows themselves, B - A, and its percentile interval
    over `resamples` draws that resample each source's rows with replacement (the same draw for both)."""
    check_same_rows(a, b)
    everything = np.arange(len(a.rows))
    point_a, point_b = a.figures(everything), b.figures(everything)
    rng = np.random.default_rng(seed)
    sources = a.rows["source"].to_numpy()
    by_source = [np.flatnonzero(sources == name) for name in dict.fromkeys(sources)]
    differences: dict[str, list[float]] = {name: [] for name in point_a}
    for _ in range(resamples):
        draw = np.concatenate([rng.choice(rows, size=len(rows)) for rows in by_source])
        drawn_a, drawn_b = a.figures(draw), b.figures(draw)
        for name in differences:
            if drawn_a.get(name) is not None and drawn_b.get(name) is not None:
                differences[name].append(drawn_b[name] - drawn_a[name])
    table = []
    for name, values in differences.items():
        if point_a[name] is None or point_b[name] is None or not values:
            continue
        low, high = percentile_interval(values, confidence)
        table.append({"figure": name, "a": point_a[name], "b": point_b[name], "difference": point_b[name] - point_a[name],
                      "low": low, "high": high, "clear": bool(low > 0 or high < 0),
                      "draws": len(values)})
    return table


def format_table(table: list[dict], a: str, b: str, confidence: float) -> str:
    width = max(len(entry["figure"]) for entry in table)
    lines = [f"A = {a}, B = {b}; B - A with its {confidence:.0%} paired-bootstrap interval (* : without 0)",
             f"{'figure':<{width}}  {'A':>6}  {'B':>6}  {'B - A':>7}  interval"]
    lines += [f"{entry['figure']:<{width}}  {entry['a']:6.3f}  {entry['b']:6.3f}  {entry['difference']:+7.3f}  "
              f"[{entry['low']:+.3f}, {entry['high']:+.3f}]{' *' if entry['clear'] else ''}" for entry in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="a saved classifier's directory (the reference)")
    parser.add_argument("run_b", type=Path, help="another one, trained with the same seed and sources")
    parser.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES,
                        help=f"bootstrap draws (default {BOOTSTRAP_RESAMPLES})")
    parser.add_argument("--confidence", type=float, default=0.95, help="the interval's coverage (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="the draws' seed (default 0)")
    parser.add_argument("--json", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.resamples < 1 or not 0 < args.confidence < 1:
        parser.error("--resamples must be at least 1 and --confidence in (0, 1)")
    a, b = ScoredRun.read(args.run_a), ScoredRun.read(args.run_b)
    table = paired_bootstrap(a, b, args.resamples, args.seed, args.confidence)
    print(format_table(table, str(args.run_a), str(args.run_b), args.confidence))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"a": str(args.run_a), "b": str(args.run_b), "resamples": args.resamples,
                                         "confidence": args.confidence, "seed": args.seed, "figures": table},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
