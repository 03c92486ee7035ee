"""Reliability: resume after a kill, guards on training, scoring that answers every string, safe loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, fast_training_flags, synthetic_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from safety_classifier import checkpoints, training
from safety_classifier.artifacts import METADATA_FILE
from safety_classifier.cli import infer_main, parse_training_plan, train_main
from safety_classifier.errors import ModelLoadError
from safety_classifier.inference import load_classifier, predict_unsafe_probabilities
from safety_classifier.modeling import build_model, load_tokenizer

# Two epochs in fp32, so that a resumed run can be compared with an uninterrupted one closely.
RESUMABLE = ("--epochs", "2", "--dtype", "fp32", "--lora-r", "4")
TOLERANCE = 1e-5  # absolute, on metrics and on head weights
SAME_SEED_TOLERANCE = 1e-7


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    """Nested metrics (`uncalibrated`, `f1_interval`) as one flat dict, which `pytest.approx` compares."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            flat.update({f"{prefix}{key}[{i}]": item for i, item in enumerate(value)})
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def head_weights(output_dir: Path) -> torch.Tensor:
    tensors = load_file(output_dir / "adapter_model.safetensors")
    (name,) = [key for key in tensors if "score" in key]
    return tensors[name]


@pytest.fixture(scope="module")
def uninterrupted(tiny_phi3, toy_files, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    assert train_main("lora", fast_training_flags(tiny_phi3, toy_files, output_dir, *RESUMABLE)) == 0
    return output_dir


def run_killed_after_its_first_checkpoint(strategy: str, flags: list[str]) -> subprocess.CompletedProcess:
    """The training run in a child that saves its first checkpoint, then SIGKILLs itself: no cleanup code runs."""
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import transformers
        save = transformers.Trainer._save_checkpoint
        def save_then_die(self, *args, **kwargs):
            save(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        transformers.Trainer._save_checkpoint = save_then_die
        from safety_classifier.cli import train_main
        sys.exit(train_main({strategy!r}, sys.argv[1:]))
    """)
    return subprocess.run([sys.executable, "-c", child, *flags], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_a_run_killed_after_its_first_checkpoint_resumes_to_the_same_result(tiny_phi3, toy_files, tmp_path,
                                                                            uninterrupted, capsys):
    output_dir = tmp_path / "killed"
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, *RESUMABLE)
    killed = run_killed_after_its_first_checkpoint("lora", flags)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in (output_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-14"]
    # Killed mid-run: the directory is not a classifier, and says so.
    with pytest.raises(ModelLoadError, match=f"{METADATA_FILE} is missing"):
        load_classifier(output_dir)

    assert train_main("lora", flags) == 0
    # It resumed (a rerun from scratch would reach the same numbers, being deterministic).
    assert f"resuming from {output_dir / 'checkpoints' / 'checkpoint-14'}" in capsys.readouterr().out
    resumed = json.loads((output_dir / "metrics.json").read_text())
    expected = json.loads((uninterrupted / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert flat_metrics(resumed[split]) == pytest.approx(flat_metrics(expected[split]), abs=TOLERANCE)
    torch.testing.assert_close(head_weights(output_dir), head_weights(uninterrupted), atol=TOLERANCE, rtol=0)
    history = json.loads((output_dir / "validation_history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1.0, 2.0]


def test_a_killed_full_layers_run_on_the_prefix_cache_resumes_to_the_same_result(tiny_phi3, toy_files, tmp_path, capsys):
    """The cached path checkpoints the wrapper's state (top blocks and head); a rerun rebuilds the cache and resumes."""
    flags = lambda output_dir: fast_training_flags(  # noqa: E731
        tiny_phi3, toy_files, output_dir, "--epochs", "2", "--dtype", "fp32", "--num-layers", "1")
    assert train_main("full_layers", flags(tmp_path / "whole")) == 0
    killed = run_killed_after_its_first_checkpoint("full_layers", flags(tmp_path / "killed"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    capsys.readouterr()
    (checkpoint,) = (tmp_path / "killed" / "checkpoints").glob("checkpoint-*")
    seconds_before_kill = json.loads((checkpoint / "training_seconds.json").read_text())["training_seconds"]
    assert seconds_before_kill > 0
    assert train_main("full_layers", flags(tmp_path / "killed")) == 0
    output = capsys.readouterr().out
    assert "resuming from" in output and "frozen prefix cached" in output
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert flat_metrics(resumed[split]) == pytest.approx(flat_metrics(expected[split]), abs=TOLERANCE)
    # The training time counts the killed run's seconds up to its checkpoint, plus the rerun's.
    metadata = json.loads((tmp_path / "killed" / METADATA_FILE).read_text())
    assert metadata["training_seconds"] > seconds_before_kill
    whole, again = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "killed"))
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], atol=TOLERANCE, rtol=0)


def test_resume_refuses_checkpoints_of_a_run_with_other_arguments(tiny_phi3, toy_files, tmp_path, capsys):
    output_dir = tmp_path / "run"
    first = fast_training_flags(tiny_phi3, toy_files, output_dir, "--lora-r", "4", "--keep-checkpoints")
    assert train_main("lora", first) == 0
    assert checkpoints.complete_checkpoints(output_dir / "checkpoints")
    plan_flags = fast_training_flags(tiny_phi3, toy_files, output_dir, "--lora-r", "8")
    assert train_main("lora", plan_flags) == 2
    assert "holds checkpoints of a run with other arguments (differing: lora_r)" in capsys.readouterr().err
    assert train_main("lora", [*plan_flags, "--no-resume"]) == 0


def test_an_incomplete_checkpoint_is_not_resumed_from(tiny_phi3, toy_files, tmp_path):
    output_dir = tmp_path / "run"
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, "--lora-r", "4", "--keep-checkpoints")
    assert train_main("lora", flags) == 0
    # A kill in the middle of writing a later checkpoint leaves it without trainer_state.json.
    torn = output_dir / "checkpoints" / "checkpoint-99"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"partial")
    plan = parse_training_plan("lora", flags)
    resumed_from = checkpoints.checkpoint_to_resume(plan)
    assert resumed_from is not None and resumed_from.name == "checkpoint-14"
    assert not torn.exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_phi3, toy_files, tmp_path, monkeypatch, capsys):
    from transformers import TrainerCallback

    class PoisonSecondEpoch(TrainerCallback):
        def on_epoch_begin(self, args, state, control, model=None, **kwargs):
            if state.epoch >= 1:
                with torch.no_grad():
                    for name, parameter in model.named_parameters():
                        if "score" in name and parameter.requires_grad:
                            parameter.fill_(float("nan"))

    class PoisonedTrainer(training.ClassifierTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(PoisonSecondEpoch())

    monkeypatch.setattr(training, "ClassifierTrainer", PoisonedTrainer)
    output_dir = tmp_path / "run"
    assert train_main("lora", fast_training_flags(tiny_phi3, toy_files, output_dir, "--epochs", "2", "--lora-r", "4")) == 2
    message = capsys.readouterr().err
    assert "the training loss became nan at step 15; training stopped" in message
    assert "The last good checkpoint is kept:" in message and "checkpoint-14" in message
    assert (output_dir / "checkpoints" / "checkpoint-14" / "trainer_state.json").is_file()
    assert not (output_dir / METADATA_FILE).exists()


def test_bad_training_data_is_refused_before_any_model_is_loaded(tmp_path, capsys):
    frame = synthetic_rows(20, 0)
    frame["toxicity"] = 1
    frame.to_csv(tmp_path / "one_class.csv", index=False)
    flags = ["--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out")]
    assert train_main("full_layers", [*flags, "--train-file", str(tmp_path / "one_class.csv")]) == 2
    assert "only unsafe (1) rows" in capsys.readouterr().err
    (tmp_path / "dup.csv").write_text("user_input,toxicity,user_input\na,0,a\nb,1,b\n")
    assert train_main("full_layers", [*flags, "--train-file", str(tmp_path / "dup.csv")]) == 2
    assert "duplicated column name(s) in the header: user_input" in capsys.readouterr().err


def test_the_same_seed_gives_the_same_metrics_twice(tiny_phi3, toy_files, tmp_path, uninterrupted):
    again = tmp_path / "again"
    assert train_main("lora", fast_training_flags(tiny_phi3, toy_files, again, *RESUMABLE)) == 0
    # Not bit for bit: in the full suite the calibrated Brier score once differed by 4e-9 (float sums
    # can take another path with the process's memory layout); a wrong seed moves them by far more.
    metrics, expected = (json.loads((run / "metrics.json").read_text()) for run in (again, uninterrupted))
    for split in ("validation", "test"):
        assert flat_metrics(metrics[split]) == pytest.approx(flat_metrics(expected[split]), abs=SAME_SEED_TOLERANCE)
    torch.testing.assert_close(head_weights(again), head_weights(uninterrupted), atol=SAME_SEED_TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def scorer(tiny_phi3):
    path = str(tiny_phi3)
    tokenizer = load_tokenizer(path)
    return build_model("full_layers", path, tokenizer, torch.float32, num_layers=0), tokenizer


NASTY_STRINGS = ["", "   \t\n ", "a" * 200_000, "\x00\x01\x02\x1b[31mred\x7f", "Ünïcödé 😀🔥 你好 مرحبا Привет",
                 "\ud800 lone surrogate", "\ud83d\ude00 split pair", "\u202eright-to-left override", "\n" * 50]


def test_scoring_answers_every_nasty_string(scorer):
    model, tokenizer = scorer
    scores = predict_unsafe_probabilities(model, tokenizer, NASTY_STRINGS, max_length=128, show_progress=False)
    assert scores.shape == (len(NASTY_STRINGS),)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[0] == scores[1] == 0.0, "empty and whitespace-only prompts are safe with probability 0.0"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=300), min_size=1, max_size=6))
def test_every_text_gets_a_probability_and_the_same_text_the_same_score(scorer, texts):
    model, tokenizer = scorer
    batch = predict_unsafe_probabilities(model, tokenizer, texts, max_length=64, show_progress=False)
    assert ((batch >= 0.0) & (batch <= 1.0)).all()
    alone = [predict_unsafe_probabilities(model, tokenizer, [text], max_length=64, show_progress=False)[0] for text in texts]
    np.testing.assert_allclose(batch, alone, atol=1e-6)


def test_invalid_utf8_in_an_input_file_is_replaced_and_reported_by_line(tmp_path, tiny_phi3, toy_files, capsys):
    output_dir = tmp_path / "clf"
    assert train_main("full_layers", fast_training_flags(tiny_phi3, toy_files, output_dir, "--num-layers", "0")) == 0
    capsys.readouterr()
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"fine prompt\nbroken \xff\xfe bytes\nalso fine\n\xc3\n")
    with pytest.warns(UserWarning, match=r"prompts\.txt: invalid UTF-8 on line\(s\) 2, 4; the bad bytes were replaced"):
        assert infer_main(["--model-dir", str(output_dir), "--input-file", str(prompts), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["fine prompt", "broken \ufffd\ufffd bytes", "also fine", "\ufffd"]


def _classifier_dir_with(tmp_path: Path, adapter: bool, weights_name: str) -> Path:
    directory = tmp_path / ("adapter" if adapter else "full")
    directory.mkdir()
    metadata = {"format_version": 1, "adapter": adapter, "base_model": "unused", "threshold": 0.5, "max_length": 64}
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"weight": torch.zeros(1)}, directory / weights_name)
    return directory


@pytest.mark.parametrize("adapter, weights_name", [(False, "pytorch_model.bin"), (True, "adapter_model.bin")])
def test_a_pickle_only_checkpoint_is_refused(tmp_path, tiny_phi3, adapter, weights_name):
    directory = _classifier_dir_with(tmp_path, adapter, weights_name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tiny_phi3 / name).read_bytes())
    with pytest.raises(ModelLoadError, match=r"pickle.*can run code when loaded"):
        load_classifier(directory)


def test_remote_code_is_not_run_without_the_flag(tmp_path, tiny_phi3, capsys):
    directory = tmp_path / "custom"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tiny_phi3 / name).read_bytes())
    marker = tmp_path / "code-ran"
    (directory / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (directory / "model.safetensors").write_bytes(b"")
    frame = synthetic_rows(30, 0)
    frame.to_csv(tmp_path / "train.csv", index=False)
    code = train_main("full_layers", ["--model", str(directory), "--train-file", str(tmp_path / "train.csv"),
                                     "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists(), "the repository's code must not run without --trust-remote-code"
