"""Training and scoring throughput, and peak GPU memory, of the flagship shapes: Phi-4-mini (3.8B) and Phi-4 (14B).

Nothing is downloaded: each backbone is built at random from its published configuration
(`microsoft/Phi-4-mini-instruct`, `microsoft/phi-4`) and saved as a plain model directory with the
embedded SmolLM2 tokenizer (so prompts tokenize somewhat longer than with Phi-4's own tokenizer).
The timed runs then go through the toolkit's own path, as the scripts train and score:

* `lora`: `train_lora.py`'s session (LoRA r=16 on every linear layer of the blocks, bf16) for one
  epoch, in the default 8-row batches and in token budgets of 4,096 and 16,384 tokens (the GPU scoring budget);
* `qlora`: `train_qlora.py`'s session (NF4 backbone, gradient checkpointing) with docs/training.md's
  `--batch-size 4 --gradient-accumulation-steps 2`, on a sample of rows that holds the longest prompts
  of the file, so the peak memory is the epoch's worst batch at `--max-length`;
* `lora-categories-batch8`: the same 8-row LoRA epoch with the AILuminate category file as a second
  source (`--category-file`, as the results table's category row: a category head, 1.2 x the file's
  training rows an epoch), so its cost beside `lora-batch8` is measured in one run;
* `score`: `predict_unsafe_probabilities` over the prompts (bf16 backbone, default token budget);
* `serve`: a head-only classifier trained on the backbone for one epoch over a few hundred rows (the
  head's values do not change the cost), then `benchmarks/load_test.py` against `serve.py` on it, at
  each `--serve-concurrency`: served against offline prompts/s, latency, batch sizes, checks.

Speed: real (non-pad) tokens/s and MFU = 4 x non-embedding parameters per real token (a frozen
backbone's forward and its activations' backward; gradient checkpointing's recomputed forward is not
counted) over the bf16 matmul rate measured in the same run. Memory: `torch.cuda.max_memory_allocated`.

    python benchmarks/gpu_shapes.py --out results/gpu-shapes.jsonl                  # on a GPU, ~5 min
    python benchmarks/gpu_shapes.py --tiny --out /tmp/shapes.jsonl --rows 24          # CPU smoke test

Each measurement is one JSON line, appended to --out as soon as it is done; one that fails (out of
memory, say) is recorded as an error line and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from benchmark import non_embedding_parameters  # noqa: E402
from transformers import AutoModelForCausalLM, Phi3Config  # noqa: E402

from safety_classifier.cli import parse_training_plan  # noqa: E402
from safety_classifier.console import quiet_library_noise  # noqa: E402
from safety_classifier.embedded import EMBEDDED_ALIAS, resolve_model_reference  # noqa: E402
from safety_classifier.inference import predict_unsafe_probabilities  # noqa: E402
from safety_classifier.modeling import count_parameters, load_sequence_classifier, load_tokenizer  # noqa: E402
from safety_classifier.sources import ailuminate_source_spec  # noqa: E402
from safety_classifier.trainer import row_lengths  # noqa: E402
from safety_classifier.training import build_training_session, load_training_splits, train_classifier  # noqa: E402

# The published configurations (config.json of each hub repository), less what only generation reads.
# Phi-4-mini's longrope factors are placeholders: prompts here stay far below its original 4,096
# positions, where the short factors apply, and their values change numbers, not cost.
SHAPES = {
    "phi-4-mini": dict(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
        original_max_position_embeddings=4096, partial_rotary_factor=0.75, rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
        rms_norm_eps=1e-5, tie_word_embeddings=True, sliding_window=None,
    ),
    "phi-4": dict(
        vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=16384,
        original_max_position_embeddings=16384, rope_theta=250000.0, rope_scaling=None,
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
    ),
}
# --tiny: the same architecture, 64 wide (bitsandbytes' CPU kernel needs it) and 4 blocks (top-4 trains them all).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152)
TINY_ROPE = {"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [1.0] * 6}

# The category source of the results table's `lora-r16-categories` row, the file's path filled in later.
CATEGORY_SOURCE = ailuminate_source_spec("{category_file}")
# (name, shape, strategy, extra training arguments) of each timed training run.
TRAINING_RUNS = [
    ("lora-batch8", "phi-4-mini", "lora", ["--batch-size", "8"]),
    ("lora-batch8-checkpointing", "phi-4-mini", "lora", ["--batch-size", "8", "--gradient-checkpointing", "true"]),
    ("lora-token-budget", "phi-4-mini", "lora", ["--max-batch-tokens", "16384"]),  # the GPU scoring budget
    ("lora-4096-tokens", "phi-4-mini", "lora", ["--max-batch-tokens", "4096"]),
    ("lora-categories-batch8", "phi-4-mini", "lora", ["--batch-size", "8", "--extra-train-sources", CATEGORY_SOURCE]),
    ("top4-batch8", "phi-4-mini", "full_layers", ["--num-layers", "4", "--batch-size", "8"]),
    ("qlora-batch4x2", "phi-4", "qlora", ["--batch-size", "4", "--gradient-accumulation-steps", "2"]),
    ("qlora-4096-tokens", "phi-4", "qlora", ["--max-batch-tokens", "4096"]),
]


def shape_config(shape: str, tiny: bool) -> Phi3Config:
    settings = dict(SHAPES[shape])
    if tiny:
        settings.update(TINY)
        if settings["rope_scaling"] is not None:
            settings["rope_scaling"] = TINY_ROPE
    return Phi3Config(**settings)


def write_random_backbone(shape: str, tiny: bool, directory: Path, tokenizer_dir: Path, device: str) -> float:
    """A randomly initialised backbone of `shape` saved (bf16 safetensors) with the tokenizer; seconds taken.

    Saved as a causal LM, like the hub's checkpoints: a saved sequence-classification model would carry
    a 2-label `score` head, which a category head's larger one cannot load over."""
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(shape, tiny), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    release_memory()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return time.perf_counter() - started


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def bf16_matmul_tflops(device: str, n: int, reps: int = 10) -> float:
    """bf16 matrix product rate on random data, after three warm-ups."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize()
    return 2.0 * n**3 * reps / (time.perf_counter() - started) / 1e12


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_training(name: str, shape: str, strategy: str, extra: list[str], model_dir: Path, rows_file: Path,
                   scratch: Path, peak_tflops: float) -> dict:
    """One epoch of a script's own training session over `rows_file`, timed whole."""
    plan = parse_training_plan(strategy, [
        "--model", str(model_dir), "--train-file", str(rows_file), "--validation-file", str(rows_file),
        "--epochs", "1", "--output-dir", str(scratch / name), "--logging-steps", "100000", *extra])
    release_memory()
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        session = build_training_session(plan, load_training_splits(plan), evaluate=False)
    load_seconds = time.perf_counter() - started
    trainer = session.trainer
    trainer.args.disable_tqdm = True
    lengths = np.asarray(row_lengths(trainer.train_dataset))
    synchronize()
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    synchronize()
    seconds = time.perf_counter() - started
    frozen = non_embedding_parameters(session.model, frozen_only=True)
    steps = trainer.state.global_step
    record = {
        "measure": "train", "run": name, "shape": shape, "strategy": strategy, "arguments": " ".join(extra),
        "rows": len(lengths), "real_tokens": int(lengths.sum()), "longest_row": int(lengths.max()),
        "optimizer_steps": steps, "load_seconds": round(load_seconds, 1), "epoch_seconds": round(seconds, 2),
        "seconds_per_optimizer_step": round(seconds / max(steps, 1), 4),
        "real_tokens_per_s": round(lengths.sum() / seconds, 1),
        # (top-N trains whole blocks over a cached prefix: its FLOPs are not 4 x the frozen weights)
        "train_mfu": (round(4 * frozen * lengths.sum() / seconds / (peak_tflops * 1e12), 4)
                      if strategy != "full_layers" else None),
        "peak_gpu_memory_gib": peak_memory_gib(),
        "gradient_checkpointing": plan.gradient_checkpointing,
        "trainable_parameters": count_parameters(session.model)[0],
    }
    del session, trainer
    release_memory()
    return record


def timed_scoring(shape: str, model_dir: Path, texts: list[str], device: str, peak_tflops: float) -> dict:
    """`predict_unsafe_probabilities` over `texts` with the bf16 backbone (what a merged classifier costs)."""
    release_memory()
    tokenizer = load_tokenizer(str(model_dir))
    model = load_sequence_classifier(str(model_dir), tokenizer, torch.bfloat16).to(device).eval()
    predict_unsafe_probabilities(model, tokenizer, texts[:64], max_length=1024, show_progress=False)  # warm-up
    synchronize()
    started = time.perf_counter()
    predict_unsafe_probabilities(model, tokenizer, texts, max_length=1024, show_progress=False)
    synchronize()
    seconds = time.perf_counter() - started
    real = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=1024)["input_ids"])
    record = {
        "measure": "score", "shape": shape, "prompts": len(texts), "real_tokens": real, "seconds": round(seconds, 2),
        "prompts_per_s": round(len(texts) / seconds, 1),
        # 2 x non-embedding parameters per real token: a forward pass.
        "score_mfu": round(2 * non_embedding_parameters(model, frozen_only=False) * real / seconds / (peak_tflops * 1e12), 4),
        "peak_gpu_memory_gib": peak_memory_gib(),
    }
    del model
    release_memory()
    return record


# What each served run keeps of load_test.py's JSON line.
SERVED_FIGURES = ("requests", "concurrency", "prompts_per_s", "offline_prompts_per_s", "served_vs_offline_ratio",
                  "served_vs_offline_median", "served_vs_offline_range", "latency_ms_p50", "latency_ms_p95",
                  "latency_ms_p99", "mean_batch_size", "batches", "model_busy_share", "prompts_per_model_second",
                  "batch_size_ceiling", "server_cpu_share", "load_generator_cpu_share", "server_rss_growth",
                  "server_rss_mb_start", "server_rss_mb_peak", "server_rss_mb_by_segment", "server_rss_parts_mb_start",
                  "server_rss_parts_mb_end",
                  "server_ready_s", "max_abs_score_difference", "tolerance", "status_counts", "checks_passed")


def head_only_classifier(model_dir: Path, rows_file: Path, output_dir: Path) -> Path:
    """A classifier directory as the scripts write it: the frozen backbone and a head trained one epoch."""
    plan = parse_training_plan("full_layers", [
        "--model", str(model_dir), "--train-file", str(rows_file), "--num-layers", "0", "--epochs", "1",
        "--output-dir", str(output_dir), "--logging-steps", "100000", "--no-resume"])
    with contextlib.redirect_stdout(sys.stderr):
        train_classifier(plan)
    release_memory()
    return output_dir


def timed_serving(shape: str, classifier_dir: Path, data_file: str, requests: int, concurrency: int,
                  segments: int) -> dict:
    """benchmarks/load_test.py against serve.py on `classifier_dir` (a process of its own, as users run it)."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "load_test.py"), "--model-dir", str(classifier_dir),
               "--data-file", data_file, "--requests", str(requests), "--concurrency", str(concurrency),
               "--segments", str(segments)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    sys.stderr.write(finished.stderr[-4000:] + finished.stdout[-4000:])
    figures = json.loads(finished.stdout.strip().splitlines()[-1])
    return {"measure": "serve", "shape": shape, **{name: figures.get(name) for name in SERVED_FIGURES},
            "exit_code": finished.returncode}


def rows_with_the_longest(frame: pd.DataFrame, count: int, text_column: str, longest: int) -> pd.DataFrame:
    """`count` rows sampled with seed 0, the `longest` longest prompts (in characters) among them."""
    lengths = frame[text_column].astype(str).str.len()
    top = frame.loc[lengths.nlargest(longest).index]
    rest = frame.drop(top.index).sample(n=max(count - longest, 0), random_state=0)
    return pd.concat([top, rest])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON-lines file the measurements are appended to")
    parser.add_argument("--train-file", default=str(REPO_ROOT.parent / "shared/data/toxicchat/toxicchat0124_train.csv"))
    parser.add_argument("--category-file", default=str(REPO_ROOT.parent / "shared/data/ailuminate/ailuminate_en_dev.csv"),
                        help="category-labelled prompts (prompt_text, category) of the lora-categories-batch8 run")
    parser.add_argument("--tokenizer", default=EMBEDDED_ALIAS, help="model directory whose tokenizer the backbones get")
    parser.add_argument("--rows", type=int, default=None, help="LoRA epoch rows (default: the whole training file)")
    parser.add_argument("--qlora-rows", type=int, default=256, help="QLoRA epoch rows, the 8 longest prompts included")
    parser.add_argument("--score-prompts", type=int, default=2000)
    parser.add_argument("--tiny", action="store_true", help="2-block, 64-wide versions of the shapes (CPU smoke test)")
    parser.add_argument("--only", nargs="+", default=None, help="run names (and 'score', 'serve') to run; default all")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--serve-rows", type=int, default=400, help="rows the served head-only classifier trains on")
    parser.add_argument("--serve-requests", type=int, default=4000, help="requests of each load test")
    parser.add_argument("--serve-concurrency", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--serve-segments", type=int, default=6)
    args = parser.parse_args(argv)
    quiet_library_noise()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    peak = bf16_matmul_tflops(device, 512 if args.tiny else 8192)
    emit({"measure": "device", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "torch": torch.__version__, "bf16_matmul_tflops": round(peak, 1 if device == "cuda" else 4), "tiny": args.tiny})
    frame = pd.read_csv(args.train_file)
    text_column = "user_input"
    lora_rows = frame if args.rows is None else frame.sample(n=args.rows, random_state=0)
    qlora_rows = rows_with_the_longest(frame, min(args.qlora_rows, len(frame)), text_column, longest=8)
    texts = frame[text_column].astype(str).tolist()
    texts = (texts * (args.score_prompts // len(texts) + 1))[: args.score_prompts]
    tokenizer_dir = Path(resolve_model_reference(args.tokenizer))
    wanted = lambda name: args.only is None or name in args.only  # noqa: E731

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        lora_rows.to_csv(scratch / "lora_rows.csv", index=False)
        qlora_rows.to_csv(scratch / "qlora_rows.csv", index=False)
        frame.sample(n=min(args.serve_rows, len(frame)), random_state=0).to_csv(scratch / "serve_rows.csv", index=False)
        for shape in args.shapes:
            runs = [run for run in TRAINING_RUNS if run[1] == shape and wanted(run[0])]
            if not runs and not wanted("score") and not wanted("serve"):
                continue
            model_dir = scratch / shape
            seconds = write_random_backbone(shape, args.tiny, model_dir, tokenizer_dir, device)
            emit({"measure": "backbone", "shape": shape, "seconds_to_build_and_save": round(seconds, 1)})
            for name, _, strategy, extra in runs:
                extra = [argument.format(category_file=args.category_file) for argument in extra]
                rows_file = scratch / ("qlora_rows.csv" if strategy == "qlora" else "lora_rows.csv")
                try:
                    emit(timed_training(name, shape, strategy, extra, model_dir, rows_file, scratch, peak))
                except Exception as error:  # one failure (out of memory, say) must not lose the other figures
                    traceback.print_exc()
                    emit({"measure": "train", "run": name, "shape": shape, "error": f"{type(error).__name__}: {error}"[:500]})
                    release_memory()
            if wanted("score"):
                try:
                    emit(timed_scoring(shape, model_dir, texts, device, peak))
                except Exception as error:
                    traceback.print_exc()
                    emit({"measure": "score", "shape": shape, "error": f"{type(error).__name__}: {error}"[:500]})
                    release_memory()
            if wanted("serve"):
                try:
                    classifier_dir = head_only_classifier(model_dir, scratch / "serve_rows.csv", scratch / "served")
                    for concurrency in args.serve_concurrency:
                        emit(timed_serving(shape, classifier_dir, args.train_file, args.serve_requests, concurrency,
                                           args.serve_segments))
                except Exception as error:
                    traceback.print_exc()
                    emit({"measure": "serve", "shape": shape, "error": f"{type(error).__name__}: {error}"[:500]})
                shutil.rmtree(scratch / "served", ignore_errors=True)
            shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
