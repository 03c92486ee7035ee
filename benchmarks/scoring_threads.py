"""Why the service loads its model on the thread that scores: batches of 16 training prompts
scored on the thread that loaded the classifier, then on a second thread, then on the first
again, with the process's CPU share during each.

PyTorch's OpenMP threads belong to the thread that calls into torch; a second calling thread gets
a team of its own, and once the process has more OpenMP threads than cores, libgomp stops
spinning between parallel regions, for every team. The rate drops on the second thread and stays
down on the first (`serving.batcher.new_model_thread`).

    python benchmarks/scoring_threads.py --model-dir runs/demo-lora

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd

from safety_classifier.console import quiet_library_noise
from safety_classifier.inference import load_classifier
from safety_classifier.modeling import dtype_name
from safety_classifier.serving.batcher import new_model_thread, score_texts

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "toxicchat" / "toxicchat0124_train.csv"
CPU_COUNT = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="A classifier directory written by a train_*.py script.")
    parser.add_argument("--data-file", default=str(DEFAULT_DATA), help="CSV with a user_input column.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--prompts", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16, help="Texts a batch (the load test's mean batch).")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    quiet_library_noise()
    prompts = pd.read_csv(args.data_file)["user_input"].astype(str).sample(args.prompts, random_state=args.seed).tolist()
    loading_thread = new_model_thread()
    classifier = loading_thread.submit(load_classifier, args.model_dir, dtype=args.dtype, device="cpu").result()

    def rate() -> dict:
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(prompts), args.batch_size):
            score_texts(classifier, prompts[start:start + args.batch_size], None)
        wall = time.perf_counter() - started
        return {"prompts_per_s": round(len(prompts) / wall, 2),
                "cpu_share": round((time.process_time() - cpu_started) / (wall * CPU_COUNT), 3)}

    loading_thread.submit(score_texts, classifier, prompts[:args.batch_size], None).result()  # first-call costs
    figures = {"loading_thread": loading_thread.submit(rate).result()}
    figures["second_thread"] = rate()  # this (main) thread: the second one to call into torch
    figures["loading_thread_again"] = loading_thread.submit(rate).result()
    for name, figure in figures.items():
        print(f"{name:<22} {figure['prompts_per_s']:6.1f} prompts/s, CPU share {100 * figure['cpu_share']:.0f} %")
    print(json.dumps({"model_dir": args.model_dir, "dtype": dtype_name(classifier.model), "batch_size": args.batch_size,
                      "prompts": len(prompts), **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
