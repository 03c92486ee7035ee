"""Where a served classifier's memory goes under traffic, without HTTP: the service's own warm-up,
then batches of training prompts scored as the server scores them (one `Classifier.scores` call
a batch, the heap trimmed after each), the process's RSS every few batches, and at the end the
mappings (`/proc/self/smaps`: the model file, the heap, anonymous memory) that grew most.

    python benchmarks/serving_memory.py --model-dir runs/demo-lora
    python benchmarks/serving_memory.py --model-dir runs/demo-lora --no-page-in   # the warm-up without reading every weight
    python benchmarks/serving_memory.py --model-dir runs/demo-lora --dtype bf16 --no-shape-steps   # packs of any length

Linux and glibc only (smaps, malloc_trim). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from pathlib import Path
from unittest import mock

import pandas as pd

from safety_classifier import packing
from safety_classifier.console import quiet_library_noise
from safety_classifier.inference import load_classifier
from safety_classifier.modeling import dtype_name
from safety_classifier.serving import batcher as serving_batcher
from safety_classifier.serving.memory import limit_malloc_arenas, trim_free_heap

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "toxicchat" / "toxicchat0124_train.csv"


def resident_mib_by_mapping() -> dict[str, float]:
    """RSS per mapping: a file's name, or `[heap]`, `[stack]`, `[anon]`..."""
    resident: dict[str, float] = {}
    name = "[anon]"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if ":" not in fields[0] or not fields[0][0].isupper():  # a mapping's header line
            path = fields[5] if len(fields) > 5 else "[anon]"
            name = Path(path).name if path.startswith("/") else path
        elif fields[0] == "Rss:":
            resident[name] = resident.get(name, 0.0) + int(fields[1]) / 1024
    return resident


async def measure(args: argparse.Namespace) -> dict:
    model_thread = serving_batcher.new_model_thread()  # loads and scores, as in the service
    classifier = model_thread.submit(load_classifier, args.model_dir, dtype=args.dtype, device="cpu").result()
    prompts = pd.read_csv(args.data_file)["user_input"].astype(str).tolist()
    rng = random.Random(args.seed)
    batcher = serving_batcher.Batcher(classifier, trim_heap=True, model_thread=model_thread)
    await batcher.start()
    if args.page_in:
        await batcher.warm_up()
    else:
        with mock.patch.object(serving_batcher, "page_in_weights", lambda model: 0):
            await batcher.warm_up()
    loop = asyncio.get_running_loop()
    by_mapping_start, trace = resident_mib_by_mapping(), []
    start = sum(by_mapping_start.values())
    print(f"after the warm-up: {start:,.0f} MiB", flush=True)
    for batch in range(1, args.batches + 1):
        texts = rng.sample(prompts, args.batch_size)
        await loop.run_in_executor(model_thread, serving_batcher.score_texts, classifier, texts, batcher.max_batch_tokens)
        await loop.run_in_executor(model_thread, trim_free_heap)
        if batch % args.every == 0:
            trace.append(round(sum(resident_mib_by_mapping().values()), 1))
            print(f"after {batch} batches: {trace[-1]:,.0f} MiB ({trace[-1] / start - 1:+.1%})", flush=True)
    await batcher.close()
    by_mapping_end = resident_mib_by_mapping()
    grown = sorted(by_mapping_end, key=lambda name: by_mapping_start.get(name, 0.0) - by_mapping_end[name])[:4]
    for name in grown:
        print(f"  {name}: {by_mapping_start.get(name, 0.0):,.0f} -> {by_mapping_end[name]:,.0f} MiB")
    return {"page_in": args.page_in, "dtype": dtype_name(classifier.model),
            "batches": args.batches, "batch_size": args.batch_size,
            "rss_mb_after_warm_up": round(start, 1), "rss_mb_trace": trace, "rss_growth": round(trace[-1] / start - 1, 4),
            "grown_mappings_mb": {name: [round(by_mapping_start.get(name, 0.0), 1), round(by_mapping_end[name], 1)]
                                  for name in grown}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="A classifier directory written by a train_*.py script.")
    parser.add_argument("--data-file", default=str(DEFAULT_DATA), help="CSV with a user_input column.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="As serve.py's --dtype (auto: bf16 where the CPU has native bf16, else fp32).")
    parser.add_argument("--batches", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16, help="Texts a batch (the load test's mean batch).")
    parser.add_argument("--every", type=int, default=40, help="Print RSS every this many batches.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-in", action=argparse.BooleanOptionalAction, default=True,
                        help="Read every weight in the warm-up, as serve.py does (--no-page-in: not).")
    parser.add_argument("--shape-steps", action=argparse.BooleanOptionalAction, default=True,
                        help="A half-precision model's packs padded to steps, as serve.py does "
                             "(--no-shape-steps: packs as long as their prompts, and padded batches where cheaper).")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        parser.error("reads /proc/self/smaps: Linux only")
    limit_malloc_arenas(2)  # as serve.py, before any thread allocates
    quiet_library_noise()
    with contextlib.ExitStack() as stack:
        if not args.shape_steps:
            stack.enter_context(mock.patch.object(packing, "packs_in_steps", lambda dtype, device: False))
        figures = asyncio.run(measure(args))
    print(json.dumps({"shape_steps": args.shape_steps, **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
