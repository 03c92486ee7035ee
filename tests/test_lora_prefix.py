"""LoRA on the top K blocks over the cached frozen prefix (--lora-layers top:K), on tiny random backbones (fp32, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, fast_training_flags
from safetensors.torch import load_file
from test_prefix_cache import LABELS, full_model_logits, prompts_for, train_side_by_side
from test_reliability import flat_metrics, run_killed_after_its_first_checkpoint

from safety_classifier.arguments import ArgumentError
from safety_classifier.artifacts import METADATA_FILE
from safety_classifier.cli import infer_main, parse_training_plan, train_main
from safety_classifier.formatting import encode_prompts
from safety_classifier.inference import load_classifier
from safety_classifier.modeling import LoraSettings, build_model, cpu_model, load_tokenizer
from safety_classifier.prefix_cache import CachedPrefixCollator, TopLayersOnCachedPrefix
from safety_classifier.prefix_store import build_cached_dataset

TOP_1 = ("--lora-r", "4", "--lora-layers", "top:1")
# Two epochs at a learning rate that moves the weights, so that a difference between the paths would show.
RECIPE = (*TOP_1, "--epochs", "2", "--learning-rate", "1e-3")
TOLERANCE = 1e-5


def lora_on_top_block(path: str, tokenizer, strategy: str = "lora"):
    torch.manual_seed(0)  # the head is initialised at random: same seed, same head
    model = build_model(strategy, path, tokenizer, torch.float32, lora=LoraSettings(r=4, top_layers=1))
    # LoRA's B starts at zero; random ones make the adapters change the logits from the first step.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def test_top_k_puts_adapters_on_the_top_blocks_only(tiny_phi3):
    path = str(tiny_phi3)
    model = build_model("lora", path, load_tokenizer(path), torch.float32, lora=LoraSettings(r=4, top_layers=1))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".layers.1." in name or ".score." in name for name in trainable)
    assert any(".layers.1.self_attn.qkv_proj.lora_A" in name for name in trainable)
    assert not any(".layers.0." in name and "lora_" in name for name, _ in model.named_parameters())
    assert model.peft_config["default"].layers_to_transform == [1]


@pytest.mark.parametrize("architecture, strategy", [("llama", "lora"), ("phi3", "lora"), ("phi3", "qlora")])
def test_training_lora_top_k_on_the_cache_matches_training_the_full_model(tiny_model_factory, architecture, strategy):
    path = str(tiny_model_factory(architecture))
    tokenizer = load_tokenizer(path)
    PROMPTS = prompts_for(tokenizer)  # noqa: N806
    reference = lora_on_top_block(path, tokenizer, strategy).train()
    cached = lora_on_top_block(path, tokenizer, strategy).train()
    initial = {name: p.detach().clone() for name, p in cached.named_parameters() if p.dtype.is_floating_point}

    dataset = build_cached_dataset(cached, tokenizer, encode_prompts(tokenizer, PROMPTS, 64), LABELS, num_layers=1,
                                   max_batch_tokens=40)
    wrapper = TopLayersOnCachedPrefix(cached, num_layers=1)
    trainable = {id(p) for p in cached.parameters() if p.requires_grad}
    assert {id(p) for p in wrapper.parameters() if p.requires_grad} == trainable, "the wrapper trains every adapter"
    collate = CachedPrefixCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(wrapper.eval()(**collate([dataset[i] for i in range(len(PROMPTS))])).logits,
                                   full_model_logits(reference.eval(), tokenizer, PROMPTS), atol=TOLERANCE, rtol=0)
    wrapper.train(), reference.train()

    train_side_by_side(reference, wrapper, tokenizer, PROMPTS, dataset, lr=1e-2, atol=TOLERANCE)

    trained = dict(reference.named_parameters())
    moved = 0.0
    for name, parameter in cached.named_parameters():
        if name not in initial:
            continue  # NF4's packed bytes
        torch.testing.assert_close(parameter, trained[name], atol=TOLERANCE, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        if parameter.requires_grad:
            moved = max(moved, (parameter - initial[name]).abs().max().item())
        else:
            assert torch.equal(parameter, initial[name]), f"frozen {name} changed"
    assert moved > 1e-3, "training should have moved the adapters"
    # The state a checkpoint holds: the adapters and the head, not the frozen weights of the top block.
    saved = wrapper.state_dict()
    assert saved and all("lora_" in key or "modules_to_save" in key for key in saved)
    wrapper.load_state_dict({key: torch.zeros_like(value) for key, value in saved.items()})
    assert all(not p.any() for p in wrapper.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def recipe_runs(tiny_phi3, toy_files, tmp_path_factory) -> dict[str, Path]:
    """The whole recipe (Trainer, 2 epochs, best checkpoint, reload, scoring) with and without the cache."""
    runs = {}
    for name, extra in (("cached", ()), ("uncached", ("--no-cache-prefix",))):
        runs[name] = tmp_path_factory.mktemp(f"lora-top-1-{name}")
        assert train_main("lora", fast_training_flags(tiny_phi3, toy_files, runs[name], *RECIPE, *extra)) == 0
    return runs


def test_the_recipe_with_the_cache_equals_the_recipe_without_it(recipe_runs):
    cached, uncached = (load_file(recipe_runs[name] / "adapter_model.safetensors") for name in ("cached", "uncached"))
    assert cached.keys() == uncached.keys()
    assert all(".layers.1." in key or "score" in key for key in cached)
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], atol=TOLERANCE, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    for split in ("validation", "test"):
        scores = [pd.read_csv(recipe_runs[name] / f"{split}_predictions.csv")["unsafe_probability"] for name in recipe_runs]
        np.testing.assert_allclose(scores[0], scores[1], atol=TOLERANCE)
        assert scores[0].std() > 1e-4, "training should give distinct scores"
    histories = [json.loads((recipe_runs[name] / "validation_history.json").read_text()) for name in recipe_runs]
    assert [h["epoch"] for h in histories[0]] == [h["epoch"] for h in histories[1]] == [1.0, 2.0]
    for first, second in zip(*histories):
        assert first["auprc"] == pytest.approx(second["auprc"], abs=1e-6)
    for name, run in recipe_runs.items():
        arguments = json.loads((run / METADATA_FILE).read_text())["training_arguments"]
        assert arguments["lora_layers"] == "top:1" and arguments["cache_prefix"] == (name == "cached")
        assert json.loads((run / "adapter_config.json").read_text())["layers_to_transform"] == [1]


def test_the_saved_adapter_reproduces_the_recorded_test_scores(recipe_runs, toy_files, capsys):
    from peft import AutoPeftModelForSequenceClassification

    run = recipe_runs["cached"]
    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()
    recorded = pd.read_csv(run / "test_predictions.csv")
    scores = load_classifier(run, dtype="fp32").unsafe_probabilities(texts, show_progress=False)
    np.testing.assert_allclose(scores, recorded["unsafe_probability"], atol=1e-6)

    adapter = AutoPeftModelForSequenceClassification.from_pretrained(run, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(run))
    adapter.config.pad_token_id = tokenizer.pad_token_id  # the toy base config defines none
    with torch.no_grad():
        logits = adapter(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    np.testing.assert_allclose(torch.softmax(logits, -1)[:, 1].numpy(), recorded["uncalibrated_probability"], atol=1e-5)

    # infer.py names the dtype, the CPU and why on standard error.
    assert infer_main(["--model-dir", str(run), "--examples", "hello", "--dtype", "fp32", "--device", "cpu"]) == 0
    assert f"dtype: float32 (--dtype fp32; {cpu_model()}: " in capsys.readouterr().err


def test_a_killed_lora_top_k_run_resumes_to_the_same_result(tiny_phi3, toy_files, tmp_path, recipe_runs, capsys):
    output_dir = tmp_path / "killed"
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, *RECIPE)
    killed = run_killed_after_its_first_checkpoint("lora", flags)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (checkpoint,) = (output_dir / "checkpoints").glob("checkpoint-*")
    assert all("lora_" in key or "modules_to_save" in key for key in load_file(checkpoint / "model.safetensors"))
    capsys.readouterr()
    assert train_main("lora", flags) == 0
    output = capsys.readouterr().out
    assert f"resuming from {checkpoint}" in output and "frozen prefix cached" in output
    assert "strategy: lora (adapters on the top 1 blocks)" in output
    assert f"dtype: float32 (--dtype fp32; {cpu_model()}: " in output
    resumed, expected = (json.loads((run / "metrics.json").read_text()) for run in (output_dir, recipe_runs["cached"]))
    for split in ("validation", "test"):
        assert flat_metrics(resumed[split]) == pytest.approx(flat_metrics(expected[split]), abs=TOLERANCE)
    again, whole = (load_file(run / "adapter_model.safetensors") for run in (output_dir, recipe_runs["cached"]))
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], atol=TOLERANCE, rtol=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# One torchrun, both runs in each process: starting the processes costs more than training here.
DDP_WORKER = """
import json, sys
from safety_classifier.cli import train_main
for flags in json.loads(sys.argv[1]):
    assert train_main("lora", flags) == 0
"""


def test_lora_top_k_on_the_cache_under_torchrun_with_two_gloo_processes(tiny_phi3, toy_files, tmp_path):
    """Two processes, cached and uncached: the same adapters, and the saved one scores as recorded."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    runs = {name: tmp_path / name for name in ("cached", "uncached")}
    flags = [fast_training_flags(tiny_phi3, toy_files, runs["cached"], *RECIPE),
             fast_training_flags(tiny_phi3, toy_files, runs["uncached"], *RECIPE, "--no-cache-prefix")]
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(tmp_path / "worker.py"), json.dumps(flags)],
        capture_output=True, text=True, env=environment, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("frozen prefix cached") == 1, "printed once (by rank 0), by the cached run"
    # 108 training rows / (8 per device x 2 devices) = 7 optimizer steps per epoch, 2 epochs.
    assert result.stderr.count("14/14") >= 2
    cached, uncached = (load_file(runs[name] / "adapter_model.safetensors") for name in ("cached", "uncached"))
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], atol=TOLERANCE, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()
    recorded = pd.read_csv(runs["cached"] / "test_predictions.csv")["unsafe_probability"]
    scores = load_classifier(runs["cached"], dtype="fp32").unsafe_probabilities(texts, show_progress=False)
    np.testing.assert_allclose(scores, recorded, atol=1e-6)


def test_qlora_trains_the_top_k_on_the_cache_and_saves_an_ordinary_adapter(tiny_phi3, toy_files, tmp_path, capsys):
    output_dir = tmp_path / "qlora"
    assert train_main("qlora", fast_training_flags(tiny_phi3, toy_files, output_dir, *TOP_1)) == 0
    assert "frozen prefix cached" in capsys.readouterr().out
    assert json.loads((output_dir / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()
    recorded = pd.read_csv(output_dir / "test_predictions.csv")["unsafe_probability"]
    scores = load_classifier(output_dir, dtype="fp32").unsafe_probabilities(texts, show_progress=False)
    np.testing.assert_allclose(scores, recorded, atol=1e-6)


@pytest.mark.parametrize("spec", ["top:0", "top:x", "top", "top:-1", "bottom:2", "top:1.5", ""])
def test_a_bad_lora_layers_spec_is_refused_as_it_is_parsed(tmp_path, capsys, spec):
    flags = ["--model", str(tmp_path / "no-such-model"), "--train-file", str(tmp_path / "no-such.csv"),
             "--output-dir", str(tmp_path / "out"), f"--lora-layers={spec}"]
    for strategy in ("lora", "qlora"):
        with pytest.raises(ArgumentError, match="--lora-layers must be all or top:K"):
            parse_training_plan(strategy, flags)
        assert train_main(strategy, flags) == 2
        assert "error: --lora-layers must be all or top:K" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_more_top_layers_than_the_model_has_are_refused_once_it_loads(tiny_phi3, toy_files, tmp_path, capsys):
    flags = fast_training_flags(tiny_phi3, toy_files, tmp_path / "out", "--lora-layers", "top:3")
    assert parse_training_plan("lora", flags).lora.adapted_top_layers == 3
    assert train_main("lora", flags) == 2
    error = capsys.readouterr().err
    assert "--lora-layers top:3 asks for more blocks than Phi3ForSequenceClassification has (2)" in error
    assert "Traceback" not in error


def test_target_modules_outside_the_top_blocks_are_refused(tiny_phi3):
    path = str(tiny_phi3)
    settings = LoraSettings(r=4, top_layers=1, target_modules=["model.layers.0.mlp.down_proj", "down_proj"])
    with pytest.raises(ArgumentError, match=r"top 1 block\(s\) only; --target-modules also adapts .*layers\.0"):
        build_model("lora", path, load_tokenizer(path), torch.float32, lora=settings)


def test_a_category_run_trains_the_top_k_on_the_cache_like_any_other(tiny_phi3, toy_files, tmp_path, capsys):
    """A category head, calibration and the stored thresholds: the cache changes nothing of the run around it."""
    from conftest import category_rows

    category_rows(48, seed=3).to_csv(tmp_path / "harms.csv", index=False)
    output_dir = tmp_path / "categories"
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, *TOP_1, "--extra-train-sources",
                                f"{tmp_path / 'harms.csv'},text=prompt_text,category=category,validation=0.25")
    assert train_main("lora", flags) == 0
    assert "frozen prefix cached" in capsys.readouterr().out
    metadata = json.loads((output_dir / METADATA_FILE).read_text())
    assert [entry["code"] for entry in metadata["categories"]] == ["S1", "S2", "S8", "S9"]
    assert metadata["calibration"]["method"] == "platt" and metadata["training_arguments"]["lora_layers"] == "top:1"
    rows = pd.read_csv(output_dir / "validation_predictions.csv", keep_default_na=False)
    classifier = load_classifier(output_dir, dtype="fp32")
    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()
    recorded = pd.read_csv(output_dir / "test_predictions.csv")["unsafe_probability"]
    np.testing.assert_allclose(classifier.unsafe_probabilities(texts, show_progress=False), recorded, atol=1e-6)
    assert {f"score_{code}" for code in ("S1", "S2", "S8", "S9")} <= set(rows.columns)
