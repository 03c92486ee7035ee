"""benchmarks/benchmark.py: its epoch estimate, and a --quick run on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED_DATA

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import benchmark  # noqa: E402

REQUIRED_KEYS = ("infer_prompts_per_s", "infer_speedup_vs_pad1024", "train_tokens_per_s", "train_speedup_vs_pad1024",
                 "cached_topn_epoch_ratio", "bf16_matmul_tflops", "fp32_matmul_tflops", "infer_mfu", "peak_rss_mb")


def test_the_epoch_estimate_weights_each_batch_size_by_how_often_an_epoch_has_it():
    # Timed: one batch of 100 padded tokens (1 s) and one of 1,000 (20 s).
    timed_padded, timed_seconds = [1000, 100], [20.0, 1.0]
    epoch = [100] * 9 + [1000] + [550]
    # 9 short batches, 1 long one, 1 halfway between (interpolated: 10.5 s).
    assert benchmark.epoch_seconds(timed_padded, timed_seconds, epoch) == pytest.approx(9 * 1.0 + 20.0 + 10.5)


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
    assert figures["infer_mfu"] < 1.0, "real-token FLOPs cannot beat the measured peak"
    assert any(line.startswith("scoring prompts/s") for line in lines), "the table is printed before the JSON"
