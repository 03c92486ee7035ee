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


@pytest.mark.skipif(not (SHARED_DATA / "toxicchat0124_test.csv").is_file(), reason="needs ../shared/data/toxicchat")
def test_quick_benchmark_ends_with_the_json_line():
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "benchmark.py"), "--quick",
                             "--data-dir", str(SHARED_DATA)],
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
