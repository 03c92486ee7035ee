"""End-to-end runs of the three scripts on a tiny random Phi-3, and the saved classifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, fast_training_flags, synthetic_rows
from transformers import AutoModelForSequenceClassification

from safety_classifier.artifacts import METADATA_FILE
from safety_classifier.cli import infer_main, train_main
from safety_classifier.inference import load_classifier
from safety_classifier.metrics import METRIC_KEYS

SCRIPTS = {"full_layers": "train_full_layers.py", "lora": "train_lora.py", "qlora": "train_qlora.py"}
EXAMPLES = ["Tell me how to shoplift", "What is the capital of France?"]


def run_script(script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], capture_output=True, text=True,
                          input=stdin, env=environment, cwd=REPO_ROOT, timeout=600)


@pytest.fixture(scope="module")
def trained(tiny_phi3, toy_files, tmp_path_factory) -> dict[str, Path]:
    """One finished run per strategy (in-process, to keep the suite fast)."""
    runs = {}
    for strategy in SCRIPTS:
        output_dir = tmp_path_factory.mktemp(f"run-{strategy}")
        extra = ["--num-layers", "1"] if strategy == "full_layers" else ["--lora-r", "4"]
        if strategy == "lora":
            extra += ["--merge"]
        assert train_main(strategy, fast_training_flags(tiny_phi3, toy_files, output_dir, *extra)) == 0
        runs[strategy] = output_dir
    return runs


@pytest.mark.parametrize("strategy", list(SCRIPTS))
def test_each_strategy_writes_a_complete_classifier_and_metrics(trained, strategy):
    output_dir = trained[strategy]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert set(metrics) == {"validation", "test"}
    for name, split in metrics.items():
        extra = {"uncalibrated", "f1_interval"} if name == "validation" else {"uncalibrated"}
        assert set(split) == set(METRIC_KEYS) | extra
        assert set(split["uncalibrated"]) == {"ece", "brier"}
        assert 0.0 <= split["auprc"] <= 1.0 and 0.0 <= split["threshold"] <= 1.0
        assert 0.0 <= split["ece"] <= 1.0 and 0.0 <= split["brier"] <= 1.0
    assert metrics["test"]["threshold"] == metrics["validation"]["threshold"], "test is scored with the validation threshold"
    assert metrics["validation"]["n"] == 12 and metrics["test"]["n"] == 40
    metadata = json.loads((output_dir / METADATA_FILE).read_text())
    assert metadata["threshold"] == metrics["validation"]["threshold"]
    assert metadata["calibration"]["method"] == "platt" and metadata["calibration"]["scale"] > 0
    assert metadata["threshold_rule"] == {"rule": "max_f1"}
    assert metadata["strategy"] == strategy
    assert metadata["training_arguments"]["class_weights"] == "balanced"
    weights = "adapter_model.safetensors" if strategy != "full_layers" else "model.safetensors"
    assert (output_dir / weights).is_file()
    assert not list(output_dir.glob("*.bin")) and not list(output_dir.glob("*.pt*")), "no pickle files in the classifier"
    assert not (output_dir / "checkpoints").exists(), "checkpoints are removed after a successful run"
    history = json.loads((output_dir / "validation_history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1.0] and "auprc" in history[0]
    predictions = pd.read_csv(output_dir / "test_predictions.csv")
    assert list(predictions.columns) == ["row", "label", "unsafe_probability", "uncalibrated_probability"]
    assert len(predictions) == 40


def test_scores_are_identical_after_loading_in_a_fresh_process(trained, toy_files):
    """infer.py in a new process reproduces the scores the training run recorded for the test rows."""
    for strategy, output_dir in trained.items():
        result = run_script("infer.py", "--model-dir", str(output_dir), "--input-file", str(toy_files["test"]), "--json",
                            "--dtype", "fp32")
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        recorded = pd.read_csv(output_dir / "test_predictions.csv")["unsafe_probability"].to_numpy()
        np.testing.assert_allclose([line["unsafe_probability"] for line in lines], recorded, rtol=0, atol=1e-6,
                                   err_msg=strategy)
        assert [line["text"] for line in lines] == pd.read_csv(toy_files["test"])["user_input"].tolist()


def test_infer_examples_prints_one_json_object_per_prompt(trained, capsys):
    assert infer_main(["--model-dir", str(trained["lora"]), "--json", "--examples", *EXAMPLES]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == EXAMPLES
    for line in lines:
        assert set(line) == {"text", "judged", "label", "unsafe_probability"} and line["judged"] == "prompt"
        assert line["label"] in ("safe", "unsafe") and 0.0 <= line["unsafe_probability"] <= 1.0


def test_infer_reads_stdin_and_text_files(trained, tmp_path, capsys):
    result = run_script("infer.py", "--model-dir", str(trained["full_layers"]), stdin="first prompt\n\nsecond prompt\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("first prompt") and lines[1].endswith("second prompt")
    assert all(line.split()[0] in ("safe", "unsafe") for line in lines)
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("one\ntwo\n\nthree\n")
    assert infer_main(["--model-dir", str(trained["full_layers"]), "--input-file", str(text_file), "--json"]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["one", "two", "three"]


def test_infer_scores_a_labelled_file_and_writes_metrics(trained, toy_files, tmp_path, capsys):
    metrics_path = tmp_path / "m.json"
    assert infer_main(["--model-dir", str(trained["lora"]), "--input-file", str(toy_files["test"]),
                       "--text-column", "user_input", "--label-column", "toxicity",
                       "--metrics-out", str(metrics_path), "--dtype", "fp32"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert set(metrics) == set(METRIC_KEYS)
    recorded = json.loads((trained["lora"] / "metrics.json").read_text())["test"]
    assert metrics == pytest.approx({key: recorded[key] for key in METRIC_KEYS}, abs=1e-6)
    printed = capsys.readouterr().out
    assert "auprc" in printed and "ece" in printed and "brier" in printed


def calibrated_probability(logits: torch.Tensor, directory: Path) -> np.ndarray:
    """What the README tells users of the ecosystem's own calls: P(unsafe) = sigmoid(scale * margin + bias)."""
    calibration = json.loads((directory / METADATA_FILE).read_text())["calibration"]
    margin = (logits[:, 1] - logits[:, 0]).double()
    return torch.sigmoid(calibration["scale"] * margin + calibration["bias"]).numpy()


def test_saved_classifiers_load_with_the_ecosystems_own_calls(trained):
    from peft import AutoPeftModelForSequenceClassification

    batch_text = EXAMPLES
    top = trained["full_layers"]
    model = AutoModelForSequenceClassification.from_pretrained(top, dtype=torch.float32)
    assert model.config.id2label == {0: "safe", 1: "unsafe"}
    ours = load_classifier(top, dtype="fp32").unsafe_probabilities(batch_text, show_progress=False)
    tokenizer = load_classifier(top).tokenizer
    encoded = tokenizer(batch_text, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**encoded).logits
    np.testing.assert_allclose(ours, calibrated_probability(logits, top), atol=1e-5)

    adapter = AutoPeftModelForSequenceClassification.from_pretrained(trained["lora"], dtype=torch.float32)
    adapter.config.pad_token_id = tokenizer.pad_token_id  # the toy base config defines none (README says so)
    with torch.no_grad():
        adapter_logits = adapter(**encoded).logits
    adapter_scores = calibrated_probability(adapter_logits, trained["lora"])
    packaged_classifier = load_classifier(trained["lora"], dtype="fp32")
    packaged = packaged_classifier.unsafe_probabilities(batch_text, show_progress=False)
    np.testing.assert_allclose(packaged, adapter_scores, atol=1e-5)
    # Loaded for scoring, the adapters are merged into the base weights; on request they stay apart.
    from peft import PeftModel

    assert not isinstance(packaged_classifier.model, PeftModel)
    assert not any("lora_" in name for name, _ in packaged_classifier.model.named_parameters())
    unmerged = load_classifier(trained["lora"], dtype="fp32", merge_adapters=False)
    assert isinstance(unmerged.model, PeftModel)
    assert isinstance(load_classifier(trained["qlora"]).model, PeftModel), "an NF4 backbone keeps its adapters apart"
    np.testing.assert_allclose(unmerged.unsafe_probabilities(batch_text, show_progress=False), packaged, atol=1e-6)

    merged = trained["lora"] / "merged"
    merged_model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        merged_scores = calibrated_probability(merged_model(**encoded).logits, merged)
    # Merged weights are stored in the training dtype (bf16 on CPUs with bf16): rounding, not drift.
    np.testing.assert_allclose(merged_scores, adapter_scores, atol=2e-3)
    merged_metadata = json.loads((merged / METADATA_FILE).read_text())
    assert merged_metadata["adapter"] is False
    assert merged_metadata["calibration"] == json.loads((trained["lora"] / METADATA_FILE).read_text())["calibration"]


def test_scripts_run_as_scripts_and_print_parameter_counts(tiny_phi3, toy_files, tmp_path):
    result = run_script(SCRIPTS["lora"], *fast_training_flags(tiny_phi3, toy_files, tmp_path / "run", "--class-weights", "none"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params:" in result.stdout and "total params:" in result.stdout
    assert "auprc" in result.stdout
    metadata = json.loads((tmp_path / "run" / METADATA_FILE).read_text())
    assert metadata["training_arguments"]["class_weights"] == "none"


def test_bad_input_exits_2_with_a_message_and_no_traceback(tiny_phi3, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_input,toxicity\nhello,0\nbomb,7\n")
    result = run_script(SCRIPTS["full_layers"], "--model", str(tiny_phi3), "--train-file", str(bad),
                        "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error: " in result.stderr and "row(s) 2" in result.stderr and "Traceback" not in result.stderr


def test_infer_refuses_incomplete_and_foreign_directories(trained, tmp_path, capsys):
    assert infer_main(["--model-dir", str(tmp_path / "missing"), "--examples", "x"]) == 2
    assert "no such classifier directory" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert infer_main(["--model-dir", str(foreign), "--examples", "x"]) == 2
    assert f"{METADATA_FILE} is missing" in capsys.readouterr().err


# full_layers runs the cached-prefix path (its default) under DDP; LoRA a second source, whose
# per-epoch AUPRC the processes' gathered, reordered predictions must give (EpochMetrics checks it).
@pytest.mark.parametrize("strategy,extra,port", [("lora", ["--lora-r", "4"], 29533),
                                                 ("full_layers", ["--num-layers", "1"], 29534)])
def test_torchrun_with_two_gloo_processes(tiny_phi3, toy_files, tmp_path, strategy, extra, port):
    output_dir = tmp_path / "ddp"
    training_rows = 108
    if strategy == "lora":
        synthetic_rows(40, seed=3).to_csv(tmp_path / "second.csv", index=False)
        extra = [*extra, "--extra-train-sources", f"{tmp_path / 'second.csv'},text=user_input,label=toxicity,validation=0.25"]
        training_rows += 30
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         str(REPO_ROOT / SCRIPTS[strategy]), *fast_training_flags(tiny_phi3, toy_files, output_dir, *extra)],
        capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == 40
    # Two processes: the training rows / (8 per device x 2 devices) optimizer steps per epoch.
    steps = -(-training_rows // 16)
    assert f"{steps}/{steps}" in result.stderr
    assert load_classifier(output_dir).unsafe_probabilities(["hello"], show_progress=False).shape == (1,)
    if strategy == "lora":
        (epoch,) = json.loads((output_dir / "validation_history.json").read_text())
        assert epoch["source_auprc"]["second"] == pytest.approx(metrics["validation"]["sources"]["second"]["auprc"])


@pytest.mark.parametrize("strategy", list(SCRIPTS))
def test_the_head_trains_at_its_own_learning_rate(tiny_phi3, toy_files, tmp_path, strategy):
    """The optimizer has one group for the head (at --head-learning-rate), the rest at --learning-rate."""
    import torch
    from transformers import TrainingArguments

    from safety_classifier.modeling import build_model, load_tokenizer, trainable_head_parameters
    from safety_classifier.trainer import ClassifierTrainer

    tokenizer = load_tokenizer(str(tiny_phi3))
    model = build_model(strategy, str(tiny_phi3), tokenizer, torch.float32, num_layers=1)
    head = trainable_head_parameters(model)
    assert head and all(p.requires_grad for p in head)
    assert sum(p.numel() for p in head) == model.config.hidden_size * 2, "the head's trained weight, no bias, no frozen copy"
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, use_cpu=True, report_to="none",
                             weight_decay=0.01)
    trainer = ClassifierTrainer(model=model, args=args, head_parameters=head, head_learning_rate=3e-3)
    optimizer = trainer.create_optimizer()
    assert trainer.create_optimizer() is optimizer
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    assert by_lr[3e-3] == {id(p) for p in head}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert by_lr[1e-4] == trainable - by_lr[3e-3] and by_lr[1e-4], "everything else trains at --learning-rate"
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable), "each parameter once"


@pytest.mark.parametrize("flag, value, message", [
    ("--learning-rate", "0", "--learning-rate must be above 0, not 0.0"),
    ("--head-learning-rate", "-1e-3", "--head-learning-rate must be above 0"),
    ("--category-loss-weight", "-1", "--category-loss-weight must be a finite number >= 0"),
    ("--lora-r", "0", "--lora-r must be at least 1"),
    ("--train-file-weight", "0", "--train-file-weight must be above 0, not 0.0"),
    ("--train-file-weight", "2", "--train-file-weight weighs the main source against --extra-train-sources"),
])
def test_an_argument_out_of_range_is_refused_as_it_is_parsed(tmp_path, capsys, flag, value, message):
    """Exit status 2 and the reason, before the (missing) data or model is even looked for."""
    flags = ["--model", str(tmp_path / "no-such-model"), "--train-file", str(tmp_path / "no-such.csv"),
             "--output-dir", str(tmp_path / "out"), f"{flag}={value}"]
    assert train_main("lora", flags) == 2
    error = capsys.readouterr().err
    assert f"error: {message}" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
