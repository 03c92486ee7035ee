"""Throughput of the toolkit against the naive reference, on one model and the ToxicChat prompts.

    python benchmarks/benchmark.py                          # real epochs; the all-sources ones take longest
    python benchmarks/benchmark.py --quick                  # tiny counts, small matrices (smoke test)
    python benchmarks/benchmark.py --recipe lora-r16-top8   # another recipe for the all-sources epoch

Reference approach: every prompt padded to 1,024 tokens (`padding="max_length"`), rows in file
order, fp32; scoring batches of 8, training steps of 2 rows (see benchmarks/README.md).
Toolkit: what the package does (bf16 where the CPU computes it natively, length-sorted
token-budget batches for scoring, length-grouped dynamic padding for training, frozen-prefix
caching for top-N).

Measured:
* scoring: prompts/s of `predict_unsafe_probabilities` vs the reference forward; and the same
  prompts through a LoRA r=16 classifier with its adapters beside the weights (a `PeftModel`) and
  merged into them (what `load_classifier` does), in one process;
* LoRA r=16 training: one real epoch over the training file through the toolkit's own `Trainer`
  path (token-budget batches, the scripts' defaults), timed whole: minutes, real (non-pad)
  tokens/s and `train_mfu` (4 x non-embedding parameters per real token: the forward and the
  activations' backward, over the measured matmul peak of the dtype the toolkit computes in:
  bf16 where the CPU has it natively, else fp32); the reference's timed steps (forward +
  backward + AdamW, padded to 1,024) give its rate, extrapolated per row;
* top-2 with prefix caching: one cached epoch (after the first) / one uncached epoch, same rows;
* matmul peak (bf16, fp32; bf16 on a small product where it is emulated; the higher of a measure
  before and one after the timed work) and the MFUs against it;
* `epoch_minutes_all_sources`: one training epoch over every prompt source of the shared data
  (ToxicChat's training file, AILuminate's prompts, every harm_prompts file; each training row
  once, after the run's validation split) for the default recipe (`--recipe`) and for LoRA r=16 on
  every block, through `build_training_session` as the scripts train: the frozen-prefix cache of
  the training rows (a cached recipe pays it once a run) plus the training steps; validation is
  not counted. Without --quick the epoch is trained whole; with --quick a seeded sample of the
  epoch's rows (a fixed number of steps) is trained, truncated to a short length, and both parts
  are extrapolated by real tokens to the epoch's at that length (`"extrapolated": true`, with the
  steps timed). `benchmarks/epoch_timing.py` runs one recipe's alone.

The reference is ~1024/50 times more tokens per prompt, so it runs on few rows; its per-row cost
does not depend on the prompt (every row is 1,024 tokens), so its rates are extrapolated per row
and reported with the row counts used. The LAST line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from epoch_timing import (  # noqa: E402
    DEFAULT_RECIPE,
    FULL_LORA_RECIPE,
    QUICK_MAX_LENGTH,
    QUICK_SAMPLE_ROWS,
    RECIPES,
    timed_all_sources_epoch,
    timed_lora_epoch,
)

from safety_classifier.console import quiet_library_noise  # noqa: E402
from safety_classifier.embedded import EMBEDDED_ALIAS, resolve_model_reference  # noqa: E402
from safety_classifier.inference import predict_unsafe_probabilities  # noqa: E402
from safety_classifier.modeling import (  # noqa: E402
    LoraSettings,
    build_model,
    count_parameters,
    cpu_model,
    describe_dtype,
    load_sequence_classifier,
    load_tokenizer,
    resolve_dtype,
)
from safety_classifier.prefix_cache import (  # noqa: E402
    CachedPrefixCollator,
    TopLayersOnCachedPrefix,
)
from safety_classifier.prefix_store import build_cached_dataset  # noqa: E402

REFERENCE_LENGTH = 1024
BATCH_SIZE = 8

SETTINGS = {
    # scoring prompts (toolkit / reference), LoRA steps (toolkit / reference, reference rows per step),
    # top-2 rows per epoch, matmul size
    # --quick is a smoke test: its LoRA steps skip the longest tenth of the batches (one of those
    # alone takes half a minute here), so its training figures flatter the toolkit.
    # epoch_rows: rows of the timed LoRA epoch (None: the whole training file); epoch_max_length: its truncation.
    # sources_sample_rows: training rows timed of the all-sources epochs (None: every row, no extrapolation).
    "quick": dict(score_n=48, ref_score_n=2, ref_train_steps=1, ref_train_rows=1,
                  topn_rows=24, matmul_n=768, train_pool=256, epoch_rows=64, epoch_max_length=QUICK_MAX_LENGTH,
                  sources_sample_rows=QUICK_SAMPLE_ROWS),
    "default": dict(score_n=400, ref_score_n=32, ref_train_steps=2, ref_train_rows=2,
                    topn_rows=192, matmul_n=2048, train_pool=1024, epoch_rows=None, epoch_max_length=None,
                    sources_sample_rows=None),
}

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def matmul_tflops(dtype: torch.dtype, n: int, min_seconds: float) -> float:
    """The peak: the rate of the fastest of the n^3 products timed over `min_seconds` (at least two).

    The fastest, not the mean: on a shared machine one stalled product in a short window pulled a
    --quick run's mean to a third of the rate, and its MFUs above 1."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up
    durations, started = [], time.perf_counter()
    while len(durations) < 2 or time.perf_counter() - started < min_seconds:
        product_started = time.perf_counter()
        torch.matmul(a, b)
        durations.append(time.perf_counter() - product_started)
    return 2.0 * n**3 / min(durations) / 1e12


def non_embedding_parameters(model: torch.nn.Module, frozen_only: bool = False) -> int:
    """Weights (or only the frozen ones) less the input embedding table, which costs no FLOPs;
    4-bit weights count as the values they hold (`count_parameters`)."""
    trainable, total = count_parameters(model)
    return total - (trainable if frozen_only else 0) - model.get_input_embeddings().weight.numel()


def timed_scoring(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Seconds of `predict_unsafe_probabilities` over `texts`, after a warm-up call on 8 of them."""
    predict_unsafe_probabilities(model, tokenizer, texts[:8], max_length=max_length, show_progress=False)
    started = time.perf_counter()
    predict_unsafe_probabilities(model, tokenizer, texts, max_length=max_length, show_progress=False)
    return time.perf_counter() - started


def length_grouped_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Rows sorted by length, cut into batches of `batch_size` (what group_by_length aims at)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(tokenizer, ids: list[list[int]], to_length: int | None = None) -> dict:
    if to_length is None:
        return tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    return tokenizer.pad({"input_ids": ids}, padding="max_length", max_length=to_length, return_tensors="pt")


def train_steps(model, batches: list[dict], labels: list[torch.Tensor], autocast_bf16: bool, lr: float,
                warmup: bool = True) -> list[float]:
    """Seconds of each forward + backward + AdamW step over `batches` (after one untimed warm-up step, if asked)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=lr)
    model.train()

    def step(batch, label):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = model(**batch).logits
        loss = F.cross_entropy(logits.float(), label)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    if warmup:
        step(batches[0], labels[0])
    seconds = []
    for batch, label in zip(batches, labels):
        started = time.perf_counter()
        step(batch, label)
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke test in under a minute")
    parser.add_argument("--model", default=EMBEDDED_ALIAS, help="hub id, local directory or the embedded alias")
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "toxicchat"))
    parser.add_argument("--max-length", type=int, default=REFERENCE_LENGTH, help="toolkit truncation length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                        help=f"the default recipe, whose epoch over every source is timed beside full LoRA "
                             f"({FULL_LORA_RECIPE}); default {DEFAULT_RECIPE}")
    parser.add_argument("--shared-data", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="the shared data directory (toxicchat/, ailuminate/, harm_prompts/) of the all-sources epochs")
    parser.add_argument("--train-batch-tokens", type=int, default=None,
                        help="time the LoRA epoch in batches of this many padded tokens (default: train_lora.py's "
                             "default, 8 rows)")
    args = parser.parse_args(argv)
    quiet_library_noise()
    cfg = SETTINGS["quick" if args.quick else "default"]
    started_all = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, str, str, str]] = []  # (measure, reference, toolkit, ratio)

    data_dir = Path(args.data_dir)
    test = pd.read_csv(data_dir / "toxicchat0124_test.csv")
    train = pd.read_csv(data_dir / "toxicchat0124_train.csv")
    score_texts = test["user_input"].astype(str).tolist()
    score_texts = [score_texts[i] for i in rng.permutation(len(score_texts))[: cfg["score_n"]]]
    train_index = rng.permutation(len(train))[: cfg["train_pool"]]
    train_texts = train["user_input"].astype(str).iloc[train_index].tolist()
    train_labels = train["toxicity"].astype(int).iloc[train_index].to_numpy().copy()  # writable: torch warns on read-only arrays

    model_path = resolve_model_reference(args.model)
    tokenizer = load_tokenizer(model_path)
    auto_dtype = resolve_dtype("auto")
    dtype_name = str(auto_dtype).replace("torch.", "")

    # ---- matmul peak --------------------------------------------------------------------------
    seconds = 0.6 if args.quick else 2.0
    bf16_native = auto_dtype == torch.bfloat16
    # Without native bf16 (e.g. AVX2-only CPUs) torch emulates it: one 2048^3 product takes about a
    # minute, so a 512^3 one, timed twice, shows the rate that makes `auto` pick fp32.
    bf16_tflops = matmul_tflops(torch.bfloat16, cfg["matmul_n"] if bf16_native else 512, seconds if bf16_native else 0)
    fp32_tflops = matmul_tflops(torch.float32, cfg["matmul_n"], seconds)

    # The toolkit's parts run first, so that its peak memory can be read before the reference's
    # pad-to-1,024 batches (gigabytes of activations) raise the process's high-water mark.

    # ---- scoring: toolkit -----------------------------------------------------------------------
    toolkit = load_sequence_classifier(model_path, tokenizer, auto_dtype).eval()
    n_params = non_embedding_parameters(toolkit)
    toolkit_ids = tokenizer(score_texts, truncation=True, max_length=args.max_length)["input_ids"]
    real_tokens = sum(len(ids) for ids in toolkit_ids)
    toolkit_score_s = timed_scoring(toolkit, tokenizer, score_texts, args.max_length)
    infer_prompts_per_s = len(score_texts) / toolkit_score_s
    del toolkit
    gc.collect()

    # ---- scoring a LoRA r=16 classifier: adapters apart, then merged (as `load_classifier` loads it)
    # In one dtype throughout, head included, as `load_classifier` loads it (training keeps the head in fp32).
    lora_classifier = build_model("lora", model_path, tokenizer, auto_dtype,
                                  lora=LoraSettings(r=16, alpha=32, dropout=0.0)).to(auto_dtype).eval()
    lora_apart_prompts_per_s = len(score_texts) / timed_scoring(lora_classifier, tokenizer, score_texts,
                                                                args.max_length)
    lora_classifier = lora_classifier.merge_and_unload()
    lora_merged_prompts_per_s = len(score_texts) / timed_scoring(lora_classifier, tokenizer, score_texts,
                                                                 args.max_length)
    del lora_classifier
    gc.collect()

    # ---- LoRA r=16 training: one real epoch through the toolkit's Trainer -----------------------
    epoch = timed_lora_epoch(args.model, data_dir / "toxicchat0124_train.csv", cfg["epoch_rows"],
                             cfg["epoch_max_length"], args.train_batch_tokens)
    lora_epoch_minutes = epoch["seconds"] / 60.0
    train_tokens_per_s = epoch["real_tokens"] / epoch["seconds"]
    train_ids = tokenizer(train_texts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = np.asarray([len(ids) for ids in train_ids])
    all_train_ids = tokenizer(train["user_input"].astype(str).tolist(), truncation=True,
                              max_length=args.max_length)["input_ids"]
    all_lengths = np.asarray([len(ids) for ids in all_train_ids])
    gc.collect()

    # ---- top-2: uncached epoch vs cached epochs -------------------------------------------------
    top_n = 2
    topn_labels = train_labels[: cfg["topn_rows"]]
    topn_ids = train_ids[: cfg["topn_rows"]]
    topn_len = lengths[: cfg["topn_rows"]]
    batches = length_grouped_batches(topn_len, BATCH_SIZE)
    use_autocast = auto_dtype == torch.bfloat16
    model = build_model("full_layers", model_path, tokenizer, auto_dtype, num_layers=top_n)
    uncached = [pad_batch(tokenizer, [topn_ids[i] for i in b]) for b in batches]
    labels = [torch.as_tensor(topn_labels[b]) for b in batches]
    uncached_s = sum(train_steps(model, uncached, labels, use_autocast, lr=5e-5))

    started = time.perf_counter()
    dataset = build_cached_dataset(model, tokenizer, topn_ids, topn_labels, num_layers=top_n)
    prefix_s = time.perf_counter() - started
    wrapper = TopLayersOnCachedPrefix(model, top_n)
    collate = CachedPrefixCollator(tokenizer.pad_token_id)
    cached = [collate([dataset[i] for i in b]) for b in batches]
    for batch in cached:
        batch.pop("labels")
    cached_s = sum(train_steps(wrapper, cached, labels, use_autocast, lr=5e-5))
    cached_topn_epoch_ratio = cached_s / uncached_s
    cache_mib = dataset.nbytes / 2**20
    del model, wrapper, dataset, cached, uncached
    gc.collect()

    # ---- an epoch over every source: the default recipe and full LoRA ---------------------------
    all_sources = {recipe: timed_all_sources_epoch(recipe, args.model, Path(args.shared_data),
                                                   cfg["epoch_max_length"] or args.max_length,
                                                   cfg["sources_sample_rows"], args.seed)
                   for recipe in dict.fromkeys((args.recipe, FULL_LORA_RECIPE))}
    toolkit_peak_rss_mb = peak_rss_mb()

    # ---- reference: scoring ---------------------------------------------------------------------
    reference = load_sequence_classifier(model_path, tokenizer, torch.float32).eval()
    ref_texts = score_texts[: cfg["ref_score_n"]]
    ref_ids = tokenizer(ref_texts, truncation=True, max_length=REFERENCE_LENGTH)["input_ids"]
    with torch.inference_mode():
        reference(**pad_batch(tokenizer, ref_ids[:1], REFERENCE_LENGTH))  # warm-up
        started = time.perf_counter()
        for i in range(0, len(ref_ids), BATCH_SIZE):
            reference(**pad_batch(tokenizer, ref_ids[i : i + BATCH_SIZE], REFERENCE_LENGTH))
        reference_score_s = time.perf_counter() - started
    ref_prompts_per_s = len(ref_ids) / reference_score_s
    del reference
    gc.collect()

    # ---- reference: LoRA r=16 training steps ----------------------------------------------------
    mean_real_len = float(np.minimum(lengths, REFERENCE_LENGTH).mean())
    ref_lora = build_model("lora", model_path, tokenizer, torch.float32,
                           lora=LoraSettings(r=16, alpha=32, dropout=0.05))  # the reference's dropout
    ref_rows = cfg["ref_train_rows"]
    ref_batches = [pad_batch(tokenizer, train_ids[i * ref_rows : (i + 1) * ref_rows], REFERENCE_LENGTH)
                   for i in range(cfg["ref_train_steps"])]
    ref_labels = [torch.as_tensor(train_labels[i * ref_rows : (i + 1) * ref_rows]) for i in range(cfg["ref_train_steps"])]
    # No warm-up step: a reference step takes seconds, so its one-off costs are negligible.
    ref_train_s = sum(train_steps(ref_lora, ref_batches, ref_labels, autocast_bf16=False, lr=2e-4, warmup=False))
    ref_rows_timed = ref_rows * cfg["ref_train_steps"]
    # Every reference row costs 1,024 tokens whatever its text, so an epoch costs rows x that.
    ref_lora_epoch_s = len(all_lengths) * ref_train_s / ref_rows_timed
    ref_lora_epoch_minutes = ref_lora_epoch_s / 60.0
    ref_train_tokens_per_s = float(np.minimum(all_lengths, REFERENCE_LENGTH).sum()) / ref_lora_epoch_s
    del ref_lora, ref_batches
    gc.collect()

    # The peak again, after the timed work, and the higher of the two: on a shared machine another
    # process can slow one measure more than the work timed beside it (an MFU above 1).
    fp32_tflops = max(fp32_tflops, matmul_tflops(torch.float32, cfg["matmul_n"], seconds))
    if bf16_native:
        bf16_tflops = max(bf16_tflops, matmul_tflops(torch.bfloat16, cfg["matmul_n"], seconds))
    peak = bf16_tflops if bf16_native else fp32_tflops  # every MFU is over the toolkit's dtype's peak
    infer_mfu = 2.0 * n_params * real_tokens / toolkit_score_s / (peak * 1e12)
    train_mfu = 4.0 * n_params * train_tokens_per_s / (peak * 1e12)
    ref_mfu = 2.0 * n_params * sum(len(i) for i in ref_ids) / reference_score_s / (fp32_tflops * 1e12)

    rows += [
        ("scoring prompts/s", f"{ref_prompts_per_s:.2f}", f"{infer_prompts_per_s:.2f}",
         f"{infer_prompts_per_s / ref_prompts_per_s:.1f}x"),
        ("LoRA r=16 classifier scoring prompts/s", f"{lora_apart_prompts_per_s:.2f} adapters apart",
         f"{lora_merged_prompts_per_s:.2f} merged", f"{lora_merged_prompts_per_s / lora_apart_prompts_per_s:.2f}x"),
        ("scoring real tokens/s", f"{sum(len(i) for i in ref_ids) / reference_score_s:.0f}",
         f"{real_tokens / toolkit_score_s:.0f}", ""),
        ("scoring MFU (real tokens)", f"{ref_mfu:.1%} of fp32", f"{infer_mfu:.1%} of {dtype_name}", ""),
        ("LoRA r=16 train real tokens/s", f"{ref_train_tokens_per_s:.1f}", f"{train_tokens_per_s:.1f}",
         f"{train_tokens_per_s / ref_train_tokens_per_s:.1f}x"),
        ("LoRA r=16 train MFU (real tokens)", "", f"{train_mfu:.1%} of {dtype_name}", ""),
        ("LoRA step seconds", f"{ref_train_s / cfg['ref_train_steps']:.2f} ({ref_rows} rows x 1024)",
         f"{epoch['seconds'] / epoch['steps']:.2f} ({epoch['batches']}; "
         f"{epoch['rows'] / epoch['steps']:.1f} rows a step on average)", ""),
        (f"LoRA r=16 epoch minutes ({epoch['rows']} rows; ref. estimated, toolkit measured)",
         f"{ref_lora_epoch_minutes:.1f}", f"{lora_epoch_minutes:.2f}",
         f"{ref_lora_epoch_minutes / lora_epoch_minutes:.1f}x"),
        (f"top-{top_n} epoch seconds ({len(topn_ids)} rows)", f"{uncached_s:.2f} uncached",
         f"{cached_s:.2f} cached (+{prefix_s:.2f} once)", f"{cached_topn_epoch_ratio:.3f}"),
        (f"top-{top_n} first cached epoch / uncached", "", f"{(cached_s + prefix_s) / uncached_s:.3f}", ""),
        ("prefix cache size", "", f"{cache_mib:.1f} MiB ({dtype_name})", ""),
        ("matmul TFLOP/s", f"{fp32_tflops:.3f} fp32",
         f"{bf16_tflops:.3f} bf16" + ("" if bf16_native else f" (emulated; fp32 {fp32_tflops:.3f})"), ""),
        *((f"epoch minutes, every source: {recipe}" + (" (default)" if recipe == args.recipe else ""), "",
           f"{epoch['minutes']:.2f} ({epoch['epoch_rows']} rows, {epoch['epoch_real_tokens']:,} tokens; "
           + (f"{epoch['steps_timed']} steps timed, extrapolated" if epoch["extrapolated"] else "measured")
           + (f"; prefix cache {epoch['prefix_cache_minutes']:.2f}" if epoch["prefix_cached"] else "") + ")", "")
          for recipe, epoch in all_sources.items()),
        ("peak RSS MB", f"{peak_rss_mb():.0f} (whole process)", f"{toolkit_peak_rss_mb:.0f}", ""),
    ]

    result = {
        "infer_prompts_per_s": round(infer_prompts_per_s, 3),
        "infer_speedup_vs_pad1024": round(infer_prompts_per_s / ref_prompts_per_s, 2),
        "lora_infer_prompts_per_s": round(lora_merged_prompts_per_s, 3),
        "lora_infer_unmerged_prompts_per_s": round(lora_apart_prompts_per_s, 3),
        "train_tokens_per_s": round(train_tokens_per_s, 1),
        "train_speedup_vs_pad1024": round(train_tokens_per_s / ref_train_tokens_per_s, 2),
        "train_mfu": round(train_mfu, 4),
        "lora_epoch_minutes": round(lora_epoch_minutes, 3),
        "cached_topn_epoch_ratio": round(cached_topn_epoch_ratio, 4),
        "cached_topn_first_epoch_ratio": round((cached_s + prefix_s) / uncached_s, 4),
        "bf16_matmul_tflops": round(bf16_tflops, 4),
        "fp32_matmul_tflops": round(fp32_tflops, 4),
        "mfu_peak_dtype": dtype_name,
        "infer_mfu": round(infer_mfu, 4),
        "reference_infer_mfu": round(ref_mfu, 4),
        "reference_infer_prompts_per_s": round(ref_prompts_per_s, 4),
        "reference_train_tokens_per_s": round(ref_train_tokens_per_s, 2),
        "peak_rss_mb": round(toolkit_peak_rss_mb, 1),
        "reference_peak_rss_mb": round(peak_rss_mb(), 1),
        "reference_lora_epoch_minutes_estimate": round(ref_lora_epoch_minutes, 1),
        "dtype": dtype_name,
        "model": args.model,
        "non_embedding_params": n_params,
        "counts": {
            "score_prompts": len(score_texts),
            "score_real_tokens": real_tokens,
            "reference_score_prompts": len(ref_ids),
            "lora_epoch": {key: (round(value, 2) if isinstance(value, float) else value)
                           for key, value in epoch.items()},
            "reference_train_steps": cfg["ref_train_steps"],
            "reference_train_rows_per_step": ref_rows,
            "train_pool_mean_tokens": round(mean_real_len, 1),
            "epoch_rows": len(all_lengths),
            "epoch_real_tokens": int(all_lengths.sum()),
            "topn_rows": len(topn_ids),
            "topn_layers": top_n,
            "batch_size": BATCH_SIZE,
            "reference_length": REFERENCE_LENGTH,
            "max_length": args.max_length,
        },
        "machine": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": auto_dtype == torch.bfloat16,
            "dtype_auto": describe_dtype("auto"),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python": platform.python_version(),
        },
        "default_recipe": args.recipe,
        "epoch_minutes_all_sources": {recipe: epoch["minutes"] for recipe, epoch in all_sources.items()},
        "all_sources_epochs": all_sources,
        "quick": args.quick,
        "total_seconds": round(time.perf_counter() - started_all, 1),
    }

    header = ("measure", "reference (pad 1024, fp32)", f"toolkit ({dtype_name})", "toolkit/ref")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    print(f"model {args.model} ({n_params / 1e6:.1f} M non-embedding params), {cpu_model()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print(f"scoring: {len(score_texts)} toolkit / {len(ref_ids)} reference prompts (test file); "
          f"LoRA: one toolkit epoch over {epoch['rows']} training prompts ({epoch['real_tokens']:,} real tokens, "
          f"{epoch['steps']} steps), timed whole / {cfg['ref_train_steps']} reference steps of {ref_rows} rows, "
          f"extrapolated to an epoch over the {len(all_lengths)} training prompts")
    print(line(header))
    print(line(tuple("-" * w for w in widths)))
    for row in rows:
        print(line(row))
    print(f"total {result['total_seconds']:.1f} s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
