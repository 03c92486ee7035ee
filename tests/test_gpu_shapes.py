"""benchmarks/gpu_shapes.py: its --tiny versions of the Phi-4 shapes run every measurement on CPU.

The real shapes need a GPU (results/gpu-shapes-h200.jsonl, results/gpu-shapes-h100.jsonl); this keeps the script's path through
the toolkit (LoRA, QLoRA, cached top-4, scoring) from rotting between GPU runs.
"""

from __future__ import annotations

import json
import shutil

import gpu_shapes
import pytest
from conftest import category_rows

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def tokenizer_only(tiny_phi3, tmp_path):
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_phi3 / name, directory / name)
    return directory


def test_tiny_shapes_give_every_figure(tokenizer_only, toy_files, tmp_path):
    out = tmp_path / "shapes.jsonl"
    category_file = tmp_path / "categories.csv"
    category_rows(40, seed=3).to_csv(category_file, index=False)
    gpu_shapes.main(["--tiny", "--out", str(out), "--train-file", str(toy_files["train"]),
                     "--category-file", str(category_file),
                     "--tokenizer", str(tokenizer_only), "--rows", "24", "--qlora-rows", "12", "--score-prompts", "20",
                     "--only", "lora-batch8", "lora-categories-batch8", "top4-batch8", "qlora-batch4x2", "score"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [record for record in records if "error" in record]
    training = {record["run"]: record for record in records if record["measure"] == "train"}
    assert set(training) == {"lora-batch8", "lora-categories-batch8", "top4-batch8", "qlora-batch4x2"}
    lora, qlora = training["lora-batch8"], training["qlora-batch4x2"]
    assert lora["rows"] == 24 and lora["optimizer_steps"] == 3 and 0 < lora["train_mfu"]
    # 30 category rows left after the 25 % validation carve, 1.2 times an epoch; the head gains 4 category outputs.
    with_categories = training["lora-categories-batch8"]
    assert with_categories["rows"] == 24 + 36 and with_categories["optimizer_steps"] == 8
    assert with_categories["trainable_parameters"] == lora["trainable_parameters"] + 4 * 64
    # 12 rows in batches of 4, two accumulated per optimizer step; checkpointing is QLoRA's default.
    assert qlora["rows"] == 12 and qlora["optimizer_steps"] == 2 and qlora["gradient_checkpointing"] is True
    assert training["top4-batch8"]["train_mfu"] is None
    scores = [record for record in records if record["measure"] == "score"]
    assert [record["shape"] for record in scores] == ["phi-4-mini", "phi-4"]
    assert all(record["prompts"] == 20 and record["prompts_per_s"] > 0 for record in scores)


def test_tiny_serving_trains_a_head_and_load_tests_the_server(tokenizer_only, toy_files, tmp_path):
    out = tmp_path / "serve.jsonl"
    gpu_shapes.main(["--tiny", "--out", str(out), "--train-file", str(toy_files["train"]),
                     "--tokenizer", str(tokenizer_only), "--only", "serve", "--shapes", "phi-4-mini",
                     "--serve-rows", "60", "--serve-requests", "30", "--serve-concurrency", "4", "--serve-segments", "2"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    served = [record for record in records if record["measure"] == "serve"]
    assert [record.get("error") for record in served] == [None]
    record = served[0]
    assert record["shape"] == "phi-4-mini" and record["requests"] == 30 and record["concurrency"] == 4
    assert record["checks_passed"] and record["exit_code"] == 0
    assert record["status_counts"]["200"] == 27 and record["served_vs_offline_ratio"] > 0
