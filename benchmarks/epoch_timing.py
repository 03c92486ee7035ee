"""Training epochs timed through the toolkit's own recipe (`build_training_session` and its
`Trainer`, as the training scripts run them), for `benchmark.py`:

* `timed_lora_epoch`: one LoRA r=16 epoch over ToxicChat's training file;
* `timed_all_sources_epoch`: one epoch of a named recipe (`experiments/compare_methods.py`'s
  `RECIPES`, as the experiments train it) over every prompt source of the shared data, whole, or a
  sample extrapolated by real tokens.

    python benchmarks/epoch_timing.py --recipe lora-r16-top8 [--quick]   # one all-sources epoch, as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from safety_classifier import training
from safety_classifier.cli import parse_training_plan
from safety_classifier.console import quiet_library_noise
from safety_classifier.embedded import EMBEDDED_ALIAS, resolve_model_reference
from safety_classifier.modeling import load_tokenizer
from safety_classifier.trainer import row_lengths
from safety_classifier.training import build_training_session, encode_split, load_training_splits

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT / "experiments") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "experiments"))

from compare_methods import RECIPES  # noqa: E402 - the recipes timed are the ones the experiments train

QUICK_SAMPLE_ROWS, QUICK_MAX_LENGTH = 32, 64  # --quick: training rows timed, and their truncation
# make demo's recipe, the quality-per-minute table's choice (docs/performance.md); full LoRA is
# always timed beside it.
DEFAULT_RECIPE = "lora-r16-top8"
FULL_LORA_RECIPE = "lora-r16"


def timed_lora_epoch(model: str, train_file: Path, rows: int | None, max_length: int | None,
                     max_batch_tokens: int | None = None) -> dict:
    """One LoRA r=16 epoch as `train_lora.py` trains it (its defaults: batches of 8 length-grouped rows),
    timed whole; `max_batch_tokens` times token-budget batches instead.

    Every row of the file is trained on (the file is also given as the validation file, which this
    run never evaluates); no evaluation, no checkpoint.
    """
    with tempfile.TemporaryDirectory() as scratch:
        data_file = train_file
        if rows is not None:
            data_file = Path(scratch) / "rows.csv"
            pd.read_csv(train_file).sample(n=rows, random_state=0).to_csv(data_file, index=False)
        argv = ["--model", model, "--train-file", str(data_file), "--validation-file", str(data_file),
                "--epochs", "1", "--output-dir", str(Path(scratch) / "run"), "--logging-steps", "100000"]
        if max_length is not None:
            argv += ["--max-length", str(max_length)]
        if max_batch_tokens is not None:
            argv += ["--max-batch-tokens", str(max_batch_tokens)]
        plan = parse_training_plan("lora", argv)
        splits = load_training_splits(plan)
        with contextlib.redirect_stdout(sys.stderr):
            session = build_training_session(plan, splits, evaluate=False)
        trainer = session.trainer
        trainer.args.disable_tqdm = True
        lengths = np.asarray([len(ids) for ids in trainer.train_dataset["input_ids"]])
        shapes = [batch["input_ids"].shape for batch in trainer.get_train_dataloader()]  # the epoch's padded batches
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "rows": len(lengths), "real_tokens": int(lengths.sum()),
                "padded_tokens": sum(batch_rows * width for batch_rows, width in shapes), "steps": len(shapes),
                "batches": (f"<= {session.sampler.max_batch_tokens} tok" if session.sampler is not None
                            else f"{plan.batch_rows} rows"),
                "max_length": plan.model.max_length, "lora_dropout": plan.lora.lora_dropout,
                "learning_rate": plan.learning_rate}


def all_sources_flags(shared_data: Path) -> list[str]:
    """Training flags of every prompt source of the shared data (../shared/data/README.md):
    ToxicChat's training file as the main source, AILuminate's prompts (a category each, no
    label) and every harm_prompts file (label and category), each training row once an epoch."""
    return ["--train-file", str(shared_data / "toxicchat" / "toxicchat0124_train.csv"),
            "--extra-train-sources",
            f"{shared_data / 'ailuminate' / 'ailuminate_en_dev.csv'},text=prompt_text,category=category",
            f"{shared_data / 'harm_prompts' / '*.csv'},text=text,label=label,category=category"]


@contextlib.contextmanager
def timed_prefix_caches(calls: list[tuple[float, int]]):
    """Record (seconds, tokens) of each frozen-prefix cache the recipe builds (train, then validation)."""
    original = training.build_cached_dataset

    def timed(*args, **kwargs):
        started = time.perf_counter()
        dataset = original(*args, **kwargs)
        calls.append((time.perf_counter() - started, sum(row_lengths(dataset))))
        return dataset

    training.build_cached_dataset = timed
    try:
        yield
    finally:
        training.build_cached_dataset = original


@functools.cache
def epoch_real_tokens(model: str, shared_data: Path, max_length: int, seed: int) -> int:
    """Real tokens of the all-sources training rows, as a run encodes them (the same for every recipe)."""
    plan = parse_training_plan("lora", ["--model", model, "--max-length", str(max_length), "--seed", str(seed),
                                        *all_sources_flags(shared_data)])
    tokenizer = load_tokenizer(resolve_model_reference(model))
    return sum(map(len, encode_split(load_training_splits(plan).train, tokenizer, max_length, plan.model.prompt_template)))


def recipe_flags(recipe: str) -> tuple[str, list[str]]:
    """(strategy, the training script's flags) of a recipe of `RECIPES`: ("lora", ["--lora-r", "16", ...])."""
    script, options = RECIPES[recipe]
    flags = [part for key, value in options.items() for part in (f"--{key.replace('_', '-')}", str(value))]
    return script.removeprefix("train_").removesuffix(".py"), flags


def timed_all_sources_epoch(recipe: str, model: str, shared_data: Path, max_length: int,
                            sample_rows: int | None, seed: int) -> dict:
    """One epoch of `recipe` over every prompt source (`all_sources_flags`), as its script trains
    it: the prefix cache of the training rows (cached recipes) plus the training steps, timed.

    With `sample_rows`, a seeded sample of that many training rows (and 4 validation rows) is
    trained instead, and both parts are extrapolated by real tokens to the whole epoch's.
    """
    strategy, flags = recipe_flags(recipe)
    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--model", model, "--epochs", "1", "--output-dir", str(Path(scratch) / "run"),
                "--logging-steps", "100000", "--max-length", str(max_length), "--seed", str(seed),
                *all_sources_flags(shared_data), *flags]
        plan = parse_training_plan(strategy, argv)
        splits = load_training_splits(plan)
        epoch_rows = len(splits.train)
        epoch_tokens = None  # without a sample: counted below, from what is trained
        if sample_rows is not None:
            epoch_tokens = epoch_real_tokens(model, shared_data, max_length, seed)
            rng = np.random.default_rng(seed)
            splits = dataclasses.replace(
                splits, train=splits.train.subset(np.sort(rng.permutation(epoch_rows)[:sample_rows])),
                validation=splits.validation.subset(np.sort(rng.permutation(len(splits.validation))[:4])))
        caches: list[tuple[float, int]] = []
        with timed_prefix_caches(caches), contextlib.redirect_stdout(sys.stderr):
            session = build_training_session(plan, splits, evaluate=False)
        trainer = session.trainer
        trainer.args.disable_tqdm = True
        timed_tokens = sum(row_lengths(trainer.train_dataset))
        epoch_tokens = epoch_tokens if epoch_tokens is not None else timed_tokens
        steps = len(trainer.get_train_dataloader())
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        steps_seconds = time.perf_counter() - started
        del session, trainer
        gc.collect()
    scale = epoch_tokens / timed_tokens
    # The cache of the training rows at the rate measured over every cache built (validation's too).
    cache_seconds = epoch_tokens * sum(s for s, _ in caches) / sum(t for _, t in caches) if caches else 0.0
    minutes = (steps_seconds * scale + cache_seconds) / 60.0
    return {"recipe": recipe, "command": [f"train_{strategy}.py",
                                          *flags], "minutes": round(minutes, 3),
            "steps_minutes": round(steps_seconds * scale / 60.0, 3), "prefix_cache_minutes": round(cache_seconds / 60.0, 3),
            "prefix_cached": bool(caches), "extrapolated": sample_rows is not None, "steps_timed": steps,
            "rows_timed": len(splits.train), "real_tokens_timed": int(timed_tokens), "epoch_rows": epoch_rows,
            "epoch_real_tokens": int(epoch_tokens), "max_length": max_length,
            "train_tokens_per_s": round(epoch_tokens / (minutes * 60.0), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="One training epoch of a recipe over every prompt source.")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE)
    parser.add_argument("--model", default=EMBEDDED_ALIAS, help="hub id, local directory or the embedded alias")
    parser.add_argument("--shared-data", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--max-length", type=int, default=1024, help="the run's truncation (--quick: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"time {QUICK_SAMPLE_ROWS} training rows and extrapolate to the epoch")
    args = parser.parse_args(argv)
    quiet_library_noise()
    result = timed_all_sources_epoch(args.recipe, args.model, Path(args.shared_data),
                                     QUICK_MAX_LENGTH if args.quick else args.max_length,
                                     QUICK_SAMPLE_ROWS if args.quick else None, args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
