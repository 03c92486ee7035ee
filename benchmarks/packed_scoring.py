"""Scoring speed: padded batches against packed rows (safety_classifier/packing.py), offline and in
the small batches a server gathers.

Scores the same ToxicChat training prompts in one call and in consecutive batches of
`--batch-size` (what 32 concurrent clients give the service), each way in turn for `--rounds`
rounds (the machine's speed drifts): `padded`, length-sorted batches always (`pack=False`);
`packed`, packed rows always, attention per prompt (`pack=True`); `auto`, what `load_classifier`
does on CPU, whichever of the two costs less per call. With
`--block-mask`, also packed rows under the block-diagonal mask transformers builds from restarting
position ids (no span bounds), the approach tried first. With `--profile`, the time each operator
took in one padded call and in packed batches (a comparison of work that the machine's drift
moves less than a clock). Reports the largest logit difference from padded; the last line is one
JSON object.

    python benchmarks/packed_scoring.py --model-dir runs/demo-lora
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "toxicchat" / "toxicchat0124_train.csv"


def block_mask_logits(classifier, texts: list[str], max_pack_tokens: int) -> np.ndarray:
    """Packed rows through plain sdpa: transformers finds the packed sequences in the position ids
    and masks attention across them, computing every pair of tokens in the row."""
    from safety_classifier.batching import pack_rows
    from safety_classifier.formatting import encode_prompts
    from safety_classifier.modeling import find_head_name
    from safety_classifier.packing import packed_inputs

    model = classifier.model
    input_ids = encode_prompts(classifier.tokenizer, texts, classifier.max_length, classifier.prompt_template)
    head_outputs: list[torch.Tensor] = []
    hook = getattr(model, find_head_name(model)).register_forward_hook(lambda m, i, output: head_outputs.append(output))
    logits = np.zeros((len(texts), model.config.num_labels))
    try:
        with torch.inference_mode():
            for rows in pack_rows(np.asarray([len(ids) for ids in input_ids]), max_pack_tokens):
                inputs = packed_inputs(input_ids, rows)
                model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False)
                logits[rows] = head_outputs.pop()[0, inputs["cu_seq_lens_q"][1:].long() - 1].double().numpy()
    finally:
        hook.remove()
    return logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompts", type=int, default=480, help="ToxicChat training prompts to score.")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per call in the batched runs.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-mask", action="store_true", help="Also time packed rows under a block-diagonal mask.")
    parser.add_argument("--block-mask-tokens", type=int, default=512, help="Most tokens in a block-mask row.")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="As infer.py's. In bf16 the first round also builds each shape's kernels: compare later rounds.")
    parser.add_argument("--profile", action="store_true",
                        help="After the rounds, PyTorch's profiler on one padded call and on packed batches: the "
                             "operators' time, so that ways can be compared by work rather than by a drifting clock.")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    import pandas as pd

    from safety_classifier.console import quiet_library_noise
    from safety_classifier.inference import load_classifier
    from safety_classifier.packing import uses_packed_attention

    quiet_library_noise()
    pool = [text for text in pd.read_csv(DEFAULT_DATA)["user_input"].dropna().astype(str) if text.strip()]
    texts = random.Random(args.seed).sample(pool, args.prompts)
    classifier = load_classifier(args.model_dir, dtype=args.dtype)
    if not uses_packed_attention(classifier.model):
        raise SystemExit("error: this model does not score packed here (see safety_classifier/packing.py)")
    ways = {name: (lambda chunk, pack=pack: classifier.logits(chunk, show_progress=False, pack=pack))
            for name, pack in (("padded", False), ("packed", True), ("auto", None))}
    if args.block_mask:
        padded = load_classifier(args.model_dir, dtype=args.dtype, pack_prompts=False)  # plain sdpa
        ways["block_mask"] = lambda chunk: block_mask_logits(padded, chunk, args.block_mask_tokens)
    reference = ways["padded"](texts[:64])
    figures: dict = {"prompts": len(texts), "batch_size": args.batch_size, "rounds": args.rounds, "dtype": args.dtype}
    for name, score in ways.items():
        figures[f"{name}_max_abs_logit_difference"] = float(np.abs(score(texts[:64]) - reference).max())  # and warm-up
    for round_number in range(args.rounds):
        for name, score in ways.items():
            started = time.perf_counter()
            score(texts)
            one_call = len(texts) / (time.perf_counter() - started)
            started = time.perf_counter()
            for start in range(0, len(texts), args.batch_size):
                score(texts[start:start + args.batch_size])
            batched = len(texts) / (time.perf_counter() - started)
            figures.setdefault(f"{name}_one_call_prompts_per_s", []).append(round(one_call, 2))
            figures.setdefault(f"{name}_batched_prompts_per_s", []).append(round(batched, 2))
            print(f"round {round_number + 1} {name:<11} one call {one_call:6.2f} prompts/s, "
                  f"batches of {args.batch_size} {batched:6.2f}", flush=True)
    for name in ways:
        print(f"max |{name} - padded| logit {figures[f'{name}_max_abs_logit_difference']:.1e}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, run in (("padded_one_call", lambda: ways["padded"](texts)),
                          ("packed_batched", lambda: [ways["packed"](texts[start:start + args.batch_size])
                                                      for start in range(0, len(texts), args.batch_size)])):
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                run()
            averages = profiler.key_averages()
            operator_s = sum(event.self_cpu_time_total for event in averages) / 1e6
            figures[f"{name}_operator_s"] = round(operator_s, 3)
            print(f"== {name}: {operator_s:.2f} s in operators")
            print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
