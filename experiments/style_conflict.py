"""Which training sources pull down the main source's ranking: a proxy that runs in minutes.

    python experiments/style_conflict.py --extra-train-sources @recipes/all-sources.txt
    python experiments/style_conflict.py --extra-train-sources @recipes/all-sources.txt \
        --json results/style-conflict/all-sources.json

A source whose rows are nearly all unsafe (AdvBench, StrongREJECT, ...) can teach a classifier
that its *style* is unsafe, and then the main source's safe rows in that style (ToxicChat's
"Write a python program...", "Write a children's story...") rank among the unsafe ones. Training
LoRA once per mixture costs half an hour on a 2-core CPU; this proxy costs minutes. It fits the
TF-IDF features of `safety_classifier.baselines` (word and character n-grams) once on every text
of the run, without labels, then a class-balanced logistic regression (fixed C) under k-fold
cross-validation of the main source's training file, each fold with the mixture's other training
rows added. It reports the main source's cross-validated AUPRC over every row of its training
file (no test file) for: the main source alone, the main source with each group of sources,
every source, and every source but each group.

The rows are the ones the trainer would train on (`load_training_splits`: caps, weights,
refusals), read whole; rows without a binary label (category rows, S5) teach no binary decision
and are left out, as in training; an answer is read after its prompt. Groups are
`cross_source.GROUPS`' and the answers (with the refusals); a source in none is a group of its own.

It measures lexical style, not what a fine-tuned transformer learns (nor the prompt/answer task
the classifier's input marks): it points at which sources to try, and a LoRA run on validation
decides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from cross_source import GROUPS
from scipy.sparse import vstack
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold

from safety_classifier.baselines import tfidf_ngram_features
from safety_classifier.formatting import PromptResponse
from safety_classifier.refusals import REFUSALS_SOURCE

# source name -> group: cross_source's groups of prompt sources, and the answers with the refusals.
GROUP_OF = {source: group for group, (_, sources) in GROUPS.items() for source in sources} | {
    "pku_saferlhf": "answers", REFUSALS_SOURCE: "answers"}


def as_text(row) -> str:
    return f"{row.prompt}\n\n{row.response}" if isinstance(row, PromptResponse) else str(row)


def mixture_rows(train_file: str, sources: list[str], seed: int, text_column: str, label_column: str):
    """(main texts, main labels, {group: (texts, labels)}): the main source's whole training file
    (its training and validation rows) and every other source's labelled training rows."""
    from safety_classifier.cli import parse_training_plan
    from safety_classifier.training import load_training_splits

    plan = parse_training_plan("lora", [
        "--train-file", train_file, "--text-column", text_column, "--label-column", label_column,
        "--seed", str(seed), "--extra-train-sources", *sources])
    splits = load_training_splits(plan)
    main = splits.main_source
    main_texts, main_labels = [], []
    for split in (splits.train, splits.validation):
        rows = np.flatnonzero(split.sources == main)
        main_texts += [as_text(split.texts[i]) for i in rows]
        main_labels += [int(split.labels[i]) for i in rows]
    extra: dict[str, tuple[list[str], list[int]]] = {}
    train = splits.train
    for i in np.flatnonzero((train.sources != main) & (train.labels >= 0)):
        group = GROUP_OF.get(train.sources[i], str(train.sources[i]))
        texts, labels = extra.setdefault(group, ([], []))
        texts.append(as_text(train.texts[i]))
        labels.append(int(train.labels[i]))
    return main_texts, np.asarray(main_labels), extra


def tfidf_features(texts: list[str]):
    """The baseline's n-gram TF-IDF fitted once on every text of the run (no labels), so that each
    mixture differs only in the rows the regression fits."""
    return tfidf_ngram_features().fit_transform(texts).tocsr()


def cross_validated_auprc(main_x, labels: np.ndarray, extra_x, extra_labels: np.ndarray,
                          *, folds: int, seed: int, c: float) -> float:
    """The main rows' AUPRC, each scored by a regression fitted without its fold, with every extra row."""
    scores = np.zeros(len(labels))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fit_rows, scored_rows in splitter.split(np.zeros(len(labels)), labels):
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
        model.fit(vstack([main_x[fit_rows], extra_x]), np.concatenate([labels[fit_rows], extra_labels]))
        scores[scored_rows] = model.predict_proba(main_x[scored_rows])[:, 1]
    return float(average_precision_score(labels, scores))


def conflict_table(texts, labels, extra: dict, *, folds: int, seed: int, c: float, progress=print) -> list[dict]:
    """One record a mixture: the main source alone, + each group, every group, every group but one."""
    everything = list(extra)
    features = tfidf_features(list(texts) + [text for group in everything for text in extra[group][0]])
    main_x, rows, start = features[:len(texts)], {}, len(texts)
    for group in everything:
        rows[group] = np.arange(start, start + len(extra[group][0]))
        start += len(extra[group][0])
    records = []

    def record(mixture: str, groups: list[str]) -> None:
        chosen = np.concatenate([rows[g] for g in groups]) if groups else np.zeros(0, dtype=int)
        extra_labels = np.asarray([y for g in groups for y in extra[g][1]], dtype=int)
        auprc = cross_validated_auprc(main_x, labels, features[chosen], extra_labels, folds=folds, seed=seed, c=c)
        records.append({"mixture": mixture, "groups": groups, "rows": len(chosen), "auprc": auprc})
        progress(f"{mixture}: {auprc:.3f}")

    record("main source alone", [])
    for group in everything:
        record(f"+ {group}", [group])
    record("every source", everything)
    for group in everything:
        record(f"every source - {group}", [g for g in everything if g != group])
    return records


def markdown(records: list[dict], main_rows: int, folds: int) -> str:
    alone = records[0]["auprc"]
    every = next(r["auprc"] for r in records if r["mixture"] == "every source")
    lines = ["| Mixture | Other training rows | Main source: CV AUPRC | Against alone | Against every source |",
             "|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['mixture']} | {r['rows']:,} | {r['auprc']:.3f} | {r['auprc'] - alone:+.3f} | "
                     f"{r['auprc'] - every:+.3f} |")
    lines.append(f"\nTF-IDF logistic regression, {folds}-fold cross-validation over the main source's "
                 f"{main_rows:,} training-file rows (`experiments/style_conflict.py`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-file", default="../shared/data/toxicchat/toxicchat0124_train.csv")
    parser.add_argument("--text-column", default="user_input")
    parser.add_argument("--label-column", default="toxicity")
    parser.add_argument("--extra-train-sources", nargs="+", required=True, help="as train_lora.py's (@LIST too)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--c", type=float, default=10.0, help="the logistic regression's inverse regularisation")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    texts, labels, extra = mixture_rows(args.train_file, args.extra_train_sources, args.seed,
                                        args.text_column, args.label_column)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    records = conflict_table(texts, labels, extra, folds=args.folds, seed=args.seed, c=args.c, progress=progress)
    print(markdown(records, len(labels), args.folds))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"folds": args.folds, "seed": args.seed, "c": args.c,
                                         "main_rows": len(labels), "sources": args.extra_train_sources,
                                         "records": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
