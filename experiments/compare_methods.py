"""The comparison table on ToxicChat: every fine-tuning method and two baselines, one row each.

    python experiments/compare_methods.py                    # every row not yet in results/
    python experiments/compare_methods.py --rows tfidf lora-r16
    python experiments/compare_methods.py --list

Every row trains on `toxicchat0124_train.csv` (validation carved from it: 10 %, stratified,
seed 42, the same rows for every method), picks its checkpoint, C or threshold on that
validation split, and is scored once on `toxicchat0124_test.csv` (the human-annotated test
subset). Fine-tuned rows run the toolkit's own scripts in a subprocess, with the command
recorded; baselines run here. A row whose `results/<row>/metrics.json` exists is skipped
(`--force` reruns it). Then `python experiments/report.py` draws the tables of docs/results.md,
the README's headline table and the figures.

Each `results/<row>/` holds `metrics.json` (the row's columns, its validation and test metrics
and its command), `test_scores.csv` (P(unsafe) per test row, for the curves; the labels are read
from the test file, which is never copied here) and, for fine-tuned rows,
`validation_history.json` (metrics per epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from safety_classifier.artifacts import read_metadata, write_json_atomically  # noqa: E402
from safety_classifier.calibration import f1_maximising_threshold  # noqa: E402
from safety_classifier.categories import category_route_threshold_of, unsafe_verdicts  # noqa: E402
from safety_classifier.metrics import classification_metrics  # noqa: E402
from safety_classifier.modeling import cpu_model, resolve_dtype  # noqa: E402
from safety_classifier.sources import AILUMINATE_SOURCE_WEIGHT, ailuminate_source_spec  # noqa: E402

DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "toxicchat"
RESULTS_DIR = REPO_ROOT / "results"
RUNS_DIR = REPO_ROOT / "runs" / "comparison"
BACKBONE = "SmolLM2-135M-Instruct"
SEED = 42
VALIDATION_FRACTION = 0.1
# 0.3 % of the training prompts are longer than 512 SmolLM2 tokens (no jailbreak among them);
# capping there halves the memory of the longest training batch (about 19 GB at 1,024 here).
MAX_LENGTH = 512
TEST_SCORES_FILE = "test_scores.csv"


def all_sources_flags(top_blocks: int, *more: str) -> list[str]:
    """LoRA r=16 on the top blocks at 1.6e-3 over the frozen prefix kept in runs/prefix-cache, trained on
    recipes/all-sources.txt, with `more` options."""
    return ["--lora-r", "16", "--lora-alpha", "32", "--lora-layers", f"top:{top_blocks}", "--learning-rate", "1.6e-3",
            "--extra-train-sources", "@recipes/all-sources.txt", *more, "--prefix-cache-dir", "runs/prefix-cache"]


# row name -> (method as shown, script, its strategy options)
FINE_TUNED_ROWS = {
    # Head LR 1e-2 chosen on validation (docs/experiments-log.md); every other row uses the defaults.
    "head-only": ("Head only (frozen backbone)", "train_full_layers.py",
                  ["--num-layers", "0", "--head-learning-rate", "1e-2"]),
    "top-1": ("Top 1 layer + head", "train_full_layers.py", ["--num-layers", "1"]),
    "top-2": ("Top 2 layers + head", "train_full_layers.py", ["--num-layers", "2"]),
    "top-3": ("Top 3 layers + head", "train_full_layers.py", ["--num-layers", "3"]),
    "lora-r16": ("LoRA r=16", "train_lora.py", ["--lora-r", "16", "--lora-alpha", "32"]),
    "lora-r32": ("LoRA r=32", "train_lora.py", ["--lora-r", "32", "--lora-alpha", "64"]),
    "lora-r64": ("LoRA r=64", "train_lora.py", ["--lora-r", "64", "--lora-alpha", "128"]),
    # Gradient checkpointing (QLoRA's default, to save GPU memory) recomputes every block's forward
    # pass, time this CPU is short of, and SmolLM2 fits without it; NF4, double quant, bf16 unchanged.
    "qlora-r16": ("QLoRA r=16 (NF4)", "train_qlora.py",
                  ["--lora-r", "16", "--lora-alpha", "32", "--gradient-checkpointing", "false"]),
    "qlora-r32": ("QLoRA r=32 (NF4)", "train_qlora.py",
                  ["--lora-r", "32", "--lora-alpha", "64", "--gradient-checkpointing", "false"]),
    # ToxicChat plus the AILuminate category file: a category head beside the safe/unsafe decision.
    "lora-r16-categories": ("LoRA r=16 + AILuminate categories", "train_lora.py",
                            ["--lora-r", "16", "--lora-alpha", "32",
                             "--extra-train-sources", ailuminate_source_spec("{ailuminate}")]),
    # Every source of ../shared/data (recipes/all-sources.txt: categories, harm_prompts, answers; the refusals
    # were added after this row ran), LoRA on the top 4 blocks over the frozen prefix kept in runs/prefix-cache,
    # at the rate top 4 trained best at on make demo's data (docs/experiments-log.md). The recipe file's paths
    # start at ../shared/data.
    "lora-r16-top4-all-sources": ("LoRA r=16, top 4 blocks, all sources (+ categories, answers)", "train_lora.py",
                                  all_sources_flags(4)),
    # make demo's recipe until 2026-12-04: LoRA on the top 8 blocks, the quality-per-minute table's choice
    # (docs/performance.md).
    "lora-r16-top8-all-sources": ("LoRA r=16, top 8 blocks, all sources (+ categories, answers)", "train_lora.py",
                                  all_sources_flags(8)),
    # make demo's recipe since 2026-12-04: the row above with each prompt source's share of unsafe rows
    # as a training offset (--source-prior-offsets 0.5, chosen on validation: docs/experiments-log.md).
    "lora-r16-top8-all-sources-offsets": ("LoRA r=16, top 8 blocks, all sources, source offsets (make demo)", "train_lora.py",
                                          all_sources_flags(8, "--source-prior-offsets", "0.5")),
    # make model's recipe since 2026-12-04: the row above on the top 16 blocks (docs/experiments-log.md).
    "lora-r16-top16-all-sources-offsets": ("LoRA r=16, top 16 blocks, all sources, source offsets (make model)",
                                           "train_lora.py", all_sources_flags(16, "--source-prior-offsets", "0.5")),
}
AILUMINATE_FILE = "ailuminate/ailuminate_en_dev.csv"  # beside toxicchat/ in the shared data directory
TOXICCHAT_SOURCE = "toxicchat0124_train"  # the name metrics.json gives the main source's validation rows

# ---- every prompt source at once (experiments/quality_per_minute.py, cross_source.py, mixture_search.py) ----
SHARED_DATA_DIR = DATA_DIR.parent
TOXICCHAT_FILE = "toxicchat/toxicchat0124_train.csv"
HARM_PROMPTS_DIR = "harm_prompts"
# Binary with both classes: the main source (calibration, threshold) of a run without ToxicChat.
GUARDREASONER_FILE = "harm_prompts/guardreasoner_train_sample.csv"


def prompt_source_files(data_root: Path) -> list[Path]:
    """Every labelled prompt file of the shared data: ToxicChat's training file, AILuminate's, then
    each harm_prompts file; not the responses, whose labels judge answers."""
    files = [data_root / TOXICCHAT_FILE, data_root / AILUMINATE_FILE, *sorted((data_root / HARM_PROMPTS_DIR).glob("*.csv"))]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        sys.exit(f"error: missing data file(s): {', '.join(missing)} (see ../shared/data/README.md)")
    return files


def source_columns(path: Path | str) -> tuple[str, str | None, str | None]:
    """(text, label, category) columns of a shared prompt file; AILuminate's prompts carry a
    category and no label, ToxicChat's a label and no category (../shared/data/README.md)."""
    stem = Path(path).stem
    if stem == TOXICCHAT_SOURCE:
        return "user_input", "toxicity", None
    if stem == Path(AILUMINATE_FILE).stem:
        return "prompt_text", None, "category"
    return "text", "label", "category"


def main_source_options(path: Path | str) -> dict[str, str]:
    """The column options of a training command whose `--train-file` is this shared file."""
    text, label, _ = source_columns(path)
    return {"text_column": text, "label_column": label}


def source_spec(path: str, options: dict[str, str] | None = None) -> str:
    """The `--extra-train-sources` spec of a shared prompt file, with `options` (weight, cap ...)
    appended; AILuminate's as the results table's category row trains on it, unless weighted."""
    options = dict(options or {})
    if Path(path).stem == Path(AILUMINATE_FILE).stem:
        spec = ailuminate_source_spec(path, options.pop("weight", AILUMINATE_SOURCE_WEIGHT))
    else:
        text, label, category = source_columns(path)
        spec = f"{path},text={text},label={label}" + (f",category={category}" if category else "")
    return spec + "".join(f",{key}={value}" for key, value in options.items())


# The figures per source that metrics.json gives a multi-source run: every lookup of them is here.
def validation_sources(metrics: dict) -> dict[str, dict]:
    """{source name: its validation rows' metrics (auprc, recall, fpr ...)}."""
    return metrics["validation"]["sources"]


def source_macro_auprc(metrics: dict) -> float | None:
    """The mean validation AUPRC over sources, as evaluation.py reports it (computed from the
    per-source AUPRCs for runs from before it did)."""
    if "source_macro_auprc" in metrics["validation"]:
        return metrics["validation"]["source_macro_auprc"]
    auprcs = [entry["auprc"] for entry in validation_sources(metrics).values() if entry.get("auprc") is not None]
    return float(np.mean(auprcs)) if auprcs else None


def source_auprc(metrics: dict, source: str = TOXICCHAT_SOURCE) -> float | None:
    return validation_sources(metrics)[source]["auprc"]


def row_recipe(row: str, **options: str) -> tuple[str, dict[str, str]]:
    """(script, {option: value}) of a fine-tuned row of the table, with `options` on top."""
    _, script, flags = FINE_TUNED_ROWS[row]
    return script, {**{flag.removeprefix("--").replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2])},
                    **options}


# The recipes trained on every source (quality_per_minute.py); cross_source.py and mixture_search.py train one.
RECIPES = {
    "lora-r16": row_recipe("lora-r16"),
    # 4x the LoRA default: chosen on validation for the top 4 blocks (docs/experiments-log.md, 2026-12-02).
    **{f"lora-r16-top{k}": row_recipe("lora-r16", lora_layers=f"top:{k}", learning_rate="1.6e-3") for k in (2, 4, 8)},
    "top-3": row_recipe("top-3"),
    "head-only": row_recipe("head-only"),
}
BASELINE_ROWS = {
    "tfidf-logreg": "Baseline: TF-IDF word+char n-grams, logistic regression",
    "frozen-probe": "Baseline: logistic-regression probe on frozen features",
}
ROWS = [*BASELINE_ROWS, *FINE_TUNED_ROWS]  # cheapest first


class RowFailed(RuntimeError):
    """A row's training script exited with an error."""


def data_files(data_dir: Path) -> dict[str, Path]:
    files = {"train": data_dir / "toxicchat0124_train.csv", "test": data_dir / "toxicchat0124_test.csv"}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        sys.exit(f"error: missing data file(s): {', '.join(missing)} (see ../shared/data/README.md)")
    return files


def jailbreak_recall(test_file: Path, unsafe: np.ndarray) -> dict:
    """Recall on the test rows marked jailbreaking (all of them are toxic), of the verdicts `unsafe`."""
    frame = pd.read_csv(test_file)
    if len(frame) != len(unsafe):
        raise ValueError(f"{test_file} has {len(frame)} rows but {len(unsafe)} verdicts")
    jailbreak = frame["jailbreaking"].to_numpy() == 1
    return {"jailbreak_recall": float(np.asarray(unsafe)[jailbreak].mean()), "jailbreak_n": int(jailbreak.sum())}


def write_test_scores(destination: Path, scores: np.ndarray, uncalibrated: np.ndarray | None = None) -> None:
    """P(unsafe) per test row, numbered as in the test file; no text and no label (the data stays in ../shared).

    Fine-tuned rows also keep their uncalibrated softmax, for the reliability diagram."""
    destination.mkdir(parents=True, exist_ok=True)
    columns = {"row": np.arange(len(scores)), "unsafe_probability": scores}
    if uncalibrated is not None:
        columns["uncalibrated_probability"] = uncalibrated
    pd.DataFrame(columns).to_csv(destination / TEST_SCORES_FILE, index=False, float_format="%.6g")


def machine_description() -> str:
    """Core count, CPU model and the dtype `--dtype auto` trains in: training times compare only within one."""
    dtype = str(resolve_dtype("auto")).removeprefix("torch.")
    return f"{os.cpu_count()} CPU cores, {cpu_model()}, {dtype}"


def meta_backbone(model: str | None = None):
    """The backbone `model` (default: the embedded one) without any head, its shapes only."""
    import torch
    from transformers import AutoConfig, AutoModel

    from safety_classifier.embedded import EMBEDDED_ALIAS, resolve_model_reference

    # Outside the meta context: on a fresh checkout this materialises the embedded model, reading its weights.
    config = AutoConfig.from_pretrained(resolve_model_reference(model or EMBEDDED_ALIAS))
    with torch.device("meta"):  # shapes only, no weights read
        return AutoModel.from_config(config)


def backbone_parameters() -> int:
    """Parameters of the embedded backbone without any head (embeddings tied, counted once)."""
    return sum(parameter.numel() for parameter in meta_backbone().parameters())


def run_fine_tuned(row: str, files: dict[str, Path], epochs: float) -> dict:
    method, script, options = FINE_TUNED_ROWS[row]
    run_dir = RUNS_DIR / row
    relative = lambda path: os.path.relpath(path, REPO_ROOT)  # noqa: E731 (the command runs in the repository root)
    ailuminate = files["train"].parent.parent / AILUMINATE_FILE
    if any("{ailuminate}" in option for option in options) and not ailuminate.is_file():
        raise RowFailed(f"{row}: needs {ailuminate} (see ../shared/data/README.md)")
    options = [option.replace("{ailuminate}", relative(ailuminate)) for option in options]
    command = [
        "python3", script, "--train-file", relative(files["train"]), "--test-file", relative(files["test"]),
        "--max-length", str(MAX_LENGTH), "--epochs", f"{epochs:g}", "--seed", str(SEED),
        "--output-dir", relative(run_dir), *options,
    ]
    shown = shlex.join(command)
    print(f"\n=== {row}: {shown}", flush=True)
    started = time.time()
    # Output goes straight to the terminal: the scripts show their own progress bars.
    result = subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RowFailed(f"{row}: {script} exited with status {result.returncode}")
    metadata = read_metadata(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = pd.read_csv(run_dir / "test_predictions.csv")
    scores = predictions["unsafe_probability"].to_numpy()
    # The classifier's verdicts: a category route, where one is stored, calls unsafe beside P(unsafe).
    category_scores = predictions[[f"score_{entry['code']}" for entry in metadata.get("categories") or []]].to_numpy()
    verdicts = unsafe_verdicts(scores, category_scores, metrics["test"]["threshold"],
                               category_route_threshold_of(metadata))
    metrics["test"].update(jailbreak_recall(files["test"], verdicts))
    destination = RESULTS_DIR / row
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "validation_history.json", destination / "validation_history.json")
    uncalibrated = predictions["uncalibrated_probability"].to_numpy() if "uncalibrated_probability" in predictions else None
    write_test_scores(destination, scores, uncalibrated)
    return {
        "method": method,
        "trainable_parameters": metadata["trainable_parameters"],
        "training_seconds": metadata["training_seconds"],
        "run_seconds": round(time.time() - started, 1),
        "command": shown,
        "training_arguments": metadata["training_arguments"],
        **metrics,
    }


def run_baseline(row: str, files: dict[str, Path]) -> dict:
    import torch

    from safety_classifier.baselines import fit_logistic_probe, fit_tfidf_logistic_regression, frozen_features
    from safety_classifier.data import load_splits
    from safety_classifier.embedded import EMBEDDED_ALIAS, resolve_model_reference
    from safety_classifier.modeling import load_sequence_classifier, load_tokenizer, resolve_dtype

    print(f"\n=== {row}", flush=True)
    splits = load_splits(train_file=str(files["train"]), validation_file=None, test_file=str(files["test"]),
                         text_column="user_input", label_column="toxicity",
                         validation_fraction=VALIDATION_FRACTION, seed=SEED)
    train, validation, test = splits.train, splits.validation, splits.test
    started = time.time()
    if row == "tfidf-logreg":
        model, c = fit_tfidf_logistic_regression(train.texts, train.labels, validation.texts, validation.labels)
        training_seconds = time.time() - started
        score = lambda split: model.predict_proba(split.texts)[:, 1]  # noqa: E731
        vocabulary = sum(len(v.vocabulary_) for _, v in model.steps[0][1].transformer_list)
        trainable = vocabulary + 1  # one weight per n-gram, plus the bias
    else:
        torch.manual_seed(SEED)
        model_path = resolve_model_reference(EMBEDDED_ALIAS)
        tokenizer = load_tokenizer(model_path)
        backbone = load_sequence_classifier(model_path, tokenizer, resolve_dtype("auto"))
        features = {split.name: frozen_features(backbone, tokenizer, split.texts, max_length=MAX_LENGTH,
                                                description=f"frozen features ({split.name})")
                    for split in (train, validation)}
        model, c = fit_logistic_probe(features["train"], train.labels, features["validation"], validation.labels)
        training_seconds = time.time() - started
        features["test"] = frozen_features(backbone, tokenizer, test.texts, max_length=MAX_LENGTH,
                                           description="frozen features (test)")
        score = lambda split: model.predict_proba(features[split.name])[:, 1]  # noqa: E731
        trainable = features["train"].shape[1] + 1
    validation_scores, test_scores = score(validation), score(test)
    threshold = f1_maximising_threshold(validation.labels, validation_scores)
    metrics = {"validation": classification_metrics(validation.labels, validation_scores, threshold),
               "test": classification_metrics(test.labels, test_scores, threshold)}
    metrics["test"].update(jailbreak_recall(files["test"], test_scores >= threshold))
    write_test_scores(RESULTS_DIR / row, test_scores)
    return {
        "method": BASELINE_ROWS[row],
        "trainable_parameters": int(trainable),
        "training_seconds": round(training_seconds, 1),
        "run_seconds": round(time.time() - started, 1),
        "command": f"python3 experiments/compare_methods.py --rows {row}",
        "chosen_on_validation": {"C": c},
        **metrics,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="rows to run (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun rows whose results exist")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs of the fine-tuned rows")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--list", action="store_true", help="list the rows and whether each is done")
    args = parser.parse_args(argv)
    if args.list:
        for row in ROWS:
            done = (RESULTS_DIR / row / "metrics.json").is_file()
            print(f"{row:<14} {'done' if done else 'to do'}")
        return 0
    files = data_files(args.data_dir)
    todo = [row for row in args.rows if args.force or not (RESULTS_DIR / row / "metrics.json").is_file()]
    skipped = [row for row in args.rows if row not in todo]
    if skipped:
        print(f"skipping rows with results: {', '.join(skipped)} (--force reruns them)")
    backbone_params = backbone_parameters() if todo else 0
    failed = []
    for position, row in enumerate(todo, 1):
        print(f"\n[{position}/{len(todo)}] {row}", flush=True)
        try:
            record = run_baseline(row, files) if row in BASELINE_ROWS else run_fine_tuned(row, files, args.epochs)
        except RowFailed as error:
            # One failed row (out of memory, say) should not cost the hours of the rows after it.
            print(f"error: {error}; going on with the other rows", file=sys.stderr, flush=True)
            failed.append(row)
            continue
        no_backbone = row == "tfidf-logreg"
        record = {"row": row, "backbone": "—" if no_backbone else BACKBONE,
                  "backbone_parameters": None if no_backbone else backbone_params,
                  "max_length": MAX_LENGTH, "seed": SEED, "test_subset": "human-annotated test subset",
                  "machine": machine_description(), **record}
        # metrics.json last: its presence marks the row complete.
        write_json_atomically(RESULTS_DIR / row / "metrics.json", record)
        test = record["test"]
        print(f"{row}: test AUPRC {test['auprc']:.3f}, F1 {test['f1']:.3f}, "
              f"jailbreak recall {test['jailbreak_recall']:.3f} ({record['training_seconds']:.0f} s training)",
              flush=True)
    if failed:
        print(f"error: rows that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
