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

Several runs a side (the same recipe at several `--seed`s, one `--split-seed`, so that every run
scored the same rows) compare their means, each draw's figure averaged over a side's runs; the
table also gives each side's spread (its highest run minus its lowest, on the rows themselves):

    python experiments/paired_bootstrap.py runs/a-seed42 runs/a-seed43 --versus runs/b-seed42 runs/b-seed43
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


def check_same_rows(runs: list[ScoredRun]) -> None:
    for run in runs[1:]:
        if not runs[0].rows.equals(run.rows):
            raise SystemExit(f"{runs[0].name} and {run.name} scored different validation rows: compare runs trained "
                             "with the same sources and seed (or one --split-seed)")


def side_figures(runs: list[ScoredRun], draw: np.ndarray) -> list[dict[str, float | None]]:
    return [run.figures(draw) for run in runs]


def mean_figure(figures: list[dict[str, float | None]], name: str) -> float | None:
    """A side's figure: the mean over its runs, None where a run has none."""
    values = [entry.get(name) for entry in figures]
    return None if any(value is None for value in values) else float(np.mean(values))


def paired_bootstrap(a: ScoredRun | list[ScoredRun], b: ScoredRun | list[ScoredRun],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, confidence: float = 0.95) -> list[dict]:
    """One entry a figure: A's and B's values on the rows themselves (each the mean over its runs, and
    their spread), B - A, and its percentile interval over `resamples` draws that resample each source's
    rows with replacement (the same draw for every run)."""
    side_a, side_b = ([runs] if isinstance(runs, ScoredRun) else list(runs) for runs in (a, b))
    check_same_rows(side_a + side_b)
    everything = np.arange(len(side_a[0].rows))
    whole_a, whole_b = side_figures(side_a, everything), side_figures(side_b, everything)
    rng = np.random.default_rng(seed)
    sources = side_a[0].rows["source"].to_numpy()
    by_source = [np.flatnonzero(sources == name) for name in dict.fromkeys(sources)]
    differences: dict[str, list[float]] = {name: [] for name in whole_a[0]}
    for _ in range(resamples):
        draw = np.concatenate([rng.choice(rows, size=len(rows)) for rows in by_source])
        drawn_a, drawn_b = side_figures(side_a, draw), side_figures(side_b, draw)
        for name in differences:
            value_a, value_b = mean_figure(drawn_a, name), mean_figure(drawn_b, name)
            if value_a is not None and value_b is not None:
                differences[name].append(value_b - value_a)
    table = []
    for name, values in differences.items():
        point_a, point_b = mean_figure(whole_a, name), mean_figure(whole_b, name)
        if point_a is None or point_b is None or not values:
            continue
        low, high = percentile_interval(values, confidence)
        spread = {side: max(entry[name] for entry in whole) - min(entry[name] for entry in whole)
                  for side, whole in (("a_spread", whole_a), ("b_spread", whole_b))}
        table.append({"figure": name, "a": point_a, "b": point_b, "difference": point_b - point_a,
                      "low": low, "high": high, "clear": bool(low > 0 or high < 0), "draws": len(values), **spread})
    return table


def format_table(table: list[dict], a: list[str], b: list[str], confidence: float) -> str:
    def side(runs: list[str]) -> str:
        return runs[0] if len(runs) == 1 else f"the mean of {len(runs)} runs ({', '.join(runs)})"

    spreads = len(a) > 1 or len(b) > 1
    width = max(len(entry["figure"]) for entry in table)
    lines = [f"A = {side(a)}, B = {side(b)}; B - A with its {confidence:.0%} paired-bootstrap interval (* : without 0)"
             + ("; spread: a side's highest run minus its lowest" if spreads else ""),
             f"{'figure':<{width}}  {'A':>6}  {'B':>6}  {'B - A':>7}  interval" + ("            spread A / B" if spreads else "")]
    lines += [f"{entry['figure']:<{width}}  {entry['a']:6.3f}  {entry['b']:6.3f}  {entry['difference']:+7.3f}  "
              f"[{entry['low']:+.3f}, {entry['high']:+.3f}]{' *' if entry['clear'] else '  '}"
              + (f"  {entry['a_spread']:.3f} / {entry['b_spread']:.3f}" if spreads else "") for entry in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+",
                        help="A then B: two saved classifiers' directories, the reference first; with --versus, "
                             "A's runs")
    parser.add_argument("--versus", type=Path, nargs="+", metavar="RUN",
                        help="B's runs: the other recipe at the same seeds, over the same validation rows")
    parser.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES,
                        help=f"bootstrap draws (default {BOOTSTRAP_RESAMPLES})")
    parser.add_argument("--confidence", type=float, default=0.95, help="the interval's coverage (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="the draws' seed (default 0)")
    parser.add_argument("--json", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.resamples < 1 or not 0 < args.confidence < 1:
        parser.error("--resamples must be at least 1 and --confidence in (0, 1)")
    if args.versus is None and len(args.runs) != 2:
        parser.error("give two runs (A B), or A's runs and --versus B's runs")
    paths_a, paths_b = (args.runs, args.versus) if args.versus else (args.runs[:1], args.runs[1:])
    side_a, side_b = [ScoredRun.read(path) for path in paths_a], [ScoredRun.read(path) for path in paths_b]
    table = paired_bootstrap(side_a, side_b, args.resamples, args.seed, args.confidence)
    names_a, names_b = [str(path) for path in paths_a], [str(path) for path in paths_b]
    print(format_table(table, names_a, names_b, args.confidence))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        sides = ({"a": names_a[0], "b": names_b[0]} if args.versus is None else {"a": names_a, "b": names_b})
        args.json.write_text(json.dumps({**sides, "resamples": args.resamples, "confidence": args.confidence,
                                         "seed": args.seed, "figures": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
