"""Where a LoRA training step's time goes: the toolkit's `Trainer` epoch against a bare loop on the same batches.

Both run one epoch over the same batches of the same rows (a seeded sample of the training file;
`train_lora.py`'s default 8-row length-grouped batches, or `--max-batch-tokens N` token-budget
ones), the bare loop as forward + class-free cross-entropy + backward + AdamW and nothing else,
the `Trainer` as `train_lora.py` trains (no evaluation or checkpoint). A gap between them is the
`Trainer`'s own overhead; `--lora-dropout` shows what dropout on the adapters' inputs costs;
`--attention sdpa training` compares PyTorch's SDPA with the attention training uses on a CPU
(`safety_classifier/attention.py`), the bare loop running each batch with both in turn (the order
alternating), so that the machine's drift falls on both alike. Prints one JSON line per mode and
attention.

    python benchmarks/profile_step.py --rows 300 --lora-dropout 0.05 --modes bare
    python benchmarks/profile_step.py --rows 300 --lora-dropout 0 --modes bare trainer
    python benchmarks/profile_step.py --rows 400 --modes bare --attention sdpa training
    python benchmarks/profile_step.py --rows 400 --modes bare --attention sdpa training \
        --train-file ../shared/data/ailuminate/ailuminate_en_dev.csv --text-column prompt_text
    python benchmarks/profile_step.py --modes bare --attention sdpa training --lengths 24 64 128 256 320 384 512

`--lengths` times random 8-row batches of each padded length instead of the file's (rows of 8/8 to
1/8 of it, right-padded, as the tokenizer pads), each `--repeats` times, and prints the median
step per length and attention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from benchmark import matmul_tflops, non_embedding_parameters

from safety_classifier.attention import TRAINING_ATTENTION, backbone_owner, use_training_attention
from safety_classifier.cli import parse_training_plan
from safety_classifier.console import quiet_library_noise
from safety_classifier.modeling import resolve_dtype
from safety_classifier.training import build_training_session, load_training_splits

REPO_ROOT = Path(__file__).resolve().parent.parent


ATTENTIONS = {"sdpa": "sdpa", "training": TRAINING_ATTENTION}


def set_attention(model: torch.nn.Module, attention: str) -> None:
    if attention == "training":
        use_training_attention(model)
    else:
        backbone_owner(model).set_attn_implementation(ATTENTIONS[attention])


def bare_step(model, optimizer, batch: dict, bf16: bool) -> float:
    """Seconds of forward, cross-entropy, backward and AdamW step: the least a training step must do."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    F.cross_entropy(logits[:, :2].float(), batch["labels"].reshape(len(logits), -1)[:, 0].clamp(0, 1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def bare_epoch(session, batches: list[dict], attentions: list[str]) -> dict[str, float]:
    """Seconds per attention of one bare epoch; each batch runs with every attention in turn."""
    model = session.trainer.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = dict.fromkeys(attentions, 0.0)
    for index, batch in enumerate(batches):
        for attention in attentions if index % 2 == 0 else attentions[::-1]:
            set_attention(session.model, attention)
            seconds[attention] += bare_step(model, optimizer, batch, session.trainer.args.bf16)
    return seconds


def random_batch(length: int, vocab_size: int, pad_token_id: int, generator: torch.Generator) -> dict:
    """8 rows of random tokens, the longest `length`, the others shorter by eighths, right-padded."""
    rows = 8
    input_ids = torch.randint(100, vocab_size, (rows, length), generator=generator)
    real = [max(1, length * (rows - row) // rows) for row in range(rows)]
    attention_mask = (torch.arange(length)[None, :] < torch.tensor(real)[:, None]).long()
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, pad_token_id), "attention_mask": attention_mask,
            "labels": torch.arange(rows) % 2}


def steps_by_length(session, lengths: list[int], attentions: list[str], repeats: int) -> list[dict]:
    """The median bare step of each padded length with each attention, the order alternating."""
    model = session.trainer.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab_size = session.model.get_input_embeddings().num_embeddings
    results = []
    for length in lengths:
        seconds = {attention: [] for attention in attentions}
        for repeat in range(repeats + 1):
            batch = random_batch(length, vocab_size, session.tokenizer.pad_token_id, generator)
            for attention in attentions if repeat % 2 == 0 else attentions[::-1]:
                set_attention(session.model, attention)
                spent = bare_step(model, optimizer, batch, session.trainer.args.bf16)
                if repeat:  # the first round warms up this shape
                    seconds[attention].append(spent)
        medians = {attention: round(statistics.median(times), 3) for attention, times in seconds.items()}
        results.append({"padded_length": length, "rows": 8, "median_step_seconds": medians})
    return results


def sampled_rows_file(args: argparse.Namespace, path: Path) -> None:
    """The sampled rows as the training scripts read them; a file without labels gets alternating ones
    (the time of a step does not depend on its labels)."""
    frame = pd.read_csv(args.train_file).sample(n=args.rows, random_state=0)
    frame = frame.rename(columns={args.text_column: "user_input"})
    if "toxicity" not in frame:
        frame["toxicity"] = np.arange(len(frame)) % 2
    frame[["user_input", "toxicity"]].to_csv(path, index=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300, help="training rows sampled (seed 0) from the file")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="token-budget batches of at most N padded tokens (default: 8-row batches)")
    parser.add_argument("--modes", nargs="+", choices=["bare", "trainer"], default=["bare", "trainer"])
    parser.add_argument("--attention", nargs="+", choices=list(ATTENTIONS), default=["training"],
                        help="attention during training (training: what the toolkit uses on a CPU)")
    parser.add_argument("--train-file", default=str(REPO_ROOT.parent / "shared/data/toxicchat/toxicchat0124_train.csv"))
    parser.add_argument("--text-column", default="user_input")
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="time random 8-row batches of these padded lengths (bare loop) instead of the file's")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per length and attention (--lengths)")
    args = parser.parse_args(argv)
    quiet_library_noise()
    dtype = resolve_dtype("auto")
    peak = matmul_tflops(dtype, 2048, 2.0)
    with tempfile.TemporaryDirectory() as scratch:
        rows_file = Path(scratch) / "rows.csv"
        sampled_rows_file(args, rows_file)
        for mode in args.modes:
            plan = parse_training_plan("lora", [
                "--train-file", str(rows_file), "--validation-file", str(rows_file), "--epochs", "1",
                "--output-dir", str(Path(scratch) / mode), "--logging-steps", "100000",
                "--max-length", str(args.max_length), "--lora-dropout", str(args.lora_dropout),
                *(["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else [])])
            torch.manual_seed(0)
            with contextlib.redirect_stdout(sys.stderr):
                session = build_training_session(plan, load_training_splits(plan), evaluate=False)
            session.trainer.args.disable_tqdm = True
            # The Trainer's own batches (its length-grouped sampler, or the token-budget one), collated.
            batches = list(session.trainer.get_train_dataloader())
            if args.lengths and mode == "bare":
                for line in steps_by_length(session, args.lengths, args.attention, args.repeats):
                    print(json.dumps({**line, "dtype": str(dtype).removeprefix("torch.")}), flush=True)
                continue
            if mode == "trainer":
                seconds = {}
                for attention in args.attention:
                    set_attention(session.model, attention)
                    started = time.perf_counter()
                    with contextlib.redirect_stdout(sys.stderr):
                        session.trainer.train()
                    seconds[attention] = time.perf_counter() - started
            else:
                seconds = bare_epoch(session, batches, args.attention)
            # The frozen backbone's weights less its embedding: what the 4 x FLOPs a token are counted on.
            n_params = non_embedding_parameters(session.model, frozen_only=True)
            real = int(sum(int(batch["attention_mask"].sum()) for batch in batches))
            padded = int(sum(batch["attention_mask"].numel() for batch in batches))
            for attention, spent in seconds.items():
                print(json.dumps({
                    "mode": mode, "attention": attention, "lora_dropout": args.lora_dropout,
                    "file": Path(args.train_file).name, "rows": args.rows, "steps": len(batches),
                    "real_tokens": real, "padded_tokens": padded, "seconds": round(spent, 2),
                    "seconds_per_step": round(spent / len(batches), 3),
                    "mfu_real_tokens": round(4 * n_params * real / spent / (peak * 1e12), 3),
                    "dtype": str(dtype).removeprefix("torch."), "matmul_peak_tflops": round(peak, 4),
                }), flush=True)
            del session


if __name__ == "__main__":
    main()
