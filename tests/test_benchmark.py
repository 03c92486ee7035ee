"""benchmarks/benchmark.py: a --quick run on the embedded model ends with every figure in its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SHARED_DATA

REQUIRED_KEYS = ("infer_prompts_per_s", "infer_speedup_vs_pad1024", "train_tokens_per_s", "train_speedup_vs_pad1024",
                 "train_mfu", "lora_epoch_minutes", "cached_topn_epoch_ratio", "bf16_matmul_tflops",
                 "fp32_matmul_tflops", "infer_mfu", "peak_rss_mb", "lora_infer_prompts_per_s",
                 "lora_infer_unmerged_prompts_per_s")
NEEDED = ("toxicchat/toxicchat0124_test.csv", "toxicchat/toxicchat0124_train.csv", "ailuminate", "harm_prompts")


@pytest.mark.skipif(not all((SHARED_DATA.parent / path).exists() for path in NEEDED),
                    reason="needs ../shared/data (toxicchat, ailuminate, harm_prompts)")
def test_quick_benchmark_ends_with_the_json_line():
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "benchmark.py"), "--quick",
                             "--data-dir", str(SHARED_DATA), "--shared-data", str(SHARED_DATA.parent)],
                            capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    for key in REQUIRED_KEYS:
        assert figures[key] > 0, key
    assert figures["quick"] is True and figures["counts"]["score_prompts"] == 48
    assert figures["infer_mfu"] < 1.0 and figures["train_mfu"] < 1.0, "real-token FLOPs cannot beat the measured peak"
    epoch = figures["counts"]["lora_epoch"]
    assert epoch["rows"] == 64 and epoch["steps"] >= 1 and epoch["padded_tokens"] >= epoch["real_tokens"]
    assert any(line.startswith("scoring prompts/s") for line in lines), "the table is printed before the JSON"
    # An epoch over every source, for the default recipe and full LoRA: sampled and extrapolated in --quick.
    assert figures["default_recipe"] == "lora-r16-top8"
    assert set(figures["epoch_minutes_all_sources"]) == {"lora-r16-top8", "lora-r16"}
    for recipe, minutes in figures["epoch_minutes_all_sources"].items():
        epoch = figures["all_sources_epochs"][recipe]
        assert minutes == epoch["minutes"] > 0 and epoch["extrapolated"] is True and epoch["steps_timed"] >= 1
        assert epoch["epoch_rows"] > 10_000 > epoch["rows_timed"], "every source's training rows, a sample timed"
        assert epoch["epoch_real_tokens"] > epoch["real_tokens_timed"] > 0
    assert figures["all_sources_epochs"]["lora-r16-top8"]["prefix_cached"] is True
    assert figures["all_sources_epochs"]["lora-r16"]["prefix_cached"] is False
    assert figures["machine"]["cpu_model"] and figures["fp32_matmul_tflops"] > 0
