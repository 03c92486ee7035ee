"""Where a LoRA training step's time goes: the toolkit's `Trainer` epoch against a bare loop on the same batches.

Both run one epoch over the same token-budget batches of the same rows (a seeded sample of the
training file), the bare loop as forward + class-free cross-entropy + backward + AdamW and
nothing else, the `Trainer` as `train_lora.py` trains (no evaluation or checkpoint). A gap
between them is the `Trainer`'s own overhead; `--lora-dropout` shows what dropout on the
adapters' inputs costs. Prints one JSON line per mode.

    python benchmarks/profile_step.py --rows 300 --lora-dropout 0.05 --modes bare
    python benchmarks/profile_step.py --rows 300 --lora-dropout 0 --modes bare trainer
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from benchmark import matmul_tflops, non_embedding_parameters

from safety_classifier.cli import parse_training_plan
from safety_classifier.console import quiet_library_noise
from safety_classifier.modeling import resolve_dtype
from safety_classifier.training import build_training_session, load_training_splits

REPO_ROOT = Path(__file__).resolve().parent.parent


def bare_epoch(session, batches: list[list[int]]) -> None:
    """forward, cross-entropy, backward, AdamW step: the least a training step must do."""
    trainer = session.trainer
    model, dataset, collate = trainer.model, trainer.train_dataset, trainer.data_collator
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for batch_rows in batches:
        batch = collate([{key: dataset[int(i)][key] for key in ("input_ids", "attention_mask", "labels")}
                         for i in batch_rows])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.args.bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits.float(), batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300, help="training rows sampled (seed 0) from the file")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--modes", nargs="+", choices=["bare", "trainer"], default=["bare", "trainer"])
    parser.add_argument("--train-file", default=str(REPO_ROOT.parent / "shared/data/toxicchat/toxicchat0124_train.csv"))
    args = parser.parse_args(argv)
    quiet_library_noise()
    dtype = resolve_dtype("auto")
    peak = matmul_tflops(dtype, 2048, 2.0)
    with tempfile.TemporaryDirectory() as scratch:
        rows_file = Path(scratch) / "rows.csv"
        pd.read_csv(args.train_file).sample(n=args.rows, random_state=0).to_csv(rows_file, index=False)
        for mode in args.modes:
            plan = parse_training_plan("lora", [
                "--train-file", str(rows_file), "--validation-file", str(rows_file), "--epochs", "1",
                "--output-dir", str(Path(scratch) / mode), "--logging-steps", "100000",
                "--max-length", str(args.max_length), "--lora-dropout", str(args.lora_dropout)])
            torch.manual_seed(0)
            with contextlib.redirect_stdout(sys.stderr):
                session = build_training_session(plan, load_training_splits(plan), evaluate=False)
            session.trainer.args.disable_tqdm = True
            lengths = np.asarray([len(ids) for ids in session.trainer.train_dataset["input_ids"]])
            batches = list(session.sampler)
            started = time.perf_counter()
            if mode == "trainer":
                with contextlib.redirect_stdout(sys.stderr):
                    session.trainer.train()
            else:
                bare_epoch(session, batches)
            seconds = time.perf_counter() - started
            # The frozen backbone's weights less its embedding: what the 4 x FLOPs a token are counted on.
            n_params = non_embedding_parameters(session.model, frozen_only=True)
            real, padded = int(lengths.sum()), int(sum(len(b) * lengths[b].max() for b in batches))
            print(json.dumps({
                "mode": mode, "lora_dropout": args.lora_dropout, "rows": args.rows, "steps": len(batches),
                "real_tokens": real, "padded_tokens": padded, "seconds": round(seconds, 2),
                "seconds_per_step": round(seconds / len(batches), 3),
                "mfu_real_tokens": round(4 * n_params * real / seconds / (peak * 1e12), 3),
                "dtype": str(dtype).removeprefix("torch."), "matmul_peak_tflops": round(peak, 4),
            }), flush=True)
            del session


if __name__ == "__main__":
    main()
