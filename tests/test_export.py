"""The export: a plain Hugging Face sequence-classification directory with the verdict in its config."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from conftest import fast_training_flags
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from safety_classifier.artifacts import METADATA_FILE
from safety_classifier.cli import train_main
from safety_classifier.export import CONFIG_KEY, main
from safety_classifier.formatting import encode_prompts
from safety_classifier.inference import load_classifier


def test_an_export_loads_with_transformers_alone_and_gives_the_same_logits(tiny_lora_classifier, toy_files, tmp_path):
    export_dir = tmp_path / "export"
    assert main([str(tiny_lora_classifier), str(export_dir)]) == 0
    assert not list(export_dir.glob("adapter_*"))
    metadata = json.loads((tiny_lora_classifier / METADATA_FILE).read_text())
    verdict = AutoConfig.from_pretrained(export_dir).to_dict()[CONFIG_KEY]
    assert verdict["threshold"] == metadata["threshold"] and verdict["calibration"] == metadata["calibration"]

    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()[:12]
    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = encode_prompts(tokenizer, texts, verdict["max_length"], verdict.get("prompt_template"))
    padded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**padded).logits.double().numpy()
    expected = load_classifier(tiny_lora_classifier, dtype="fp32").logits(texts, show_progress=False, pack=False)
    np.testing.assert_allclose(logits, expected, atol=1e-5)

    # The export is a classifier directory too: the toolkit scores it as it scored the original.
    np.testing.assert_allclose(load_classifier(export_dir, dtype="fp32").unsafe_probabilities(texts, show_progress=False),
                               load_classifier(tiny_lora_classifier, dtype="fp32").unsafe_probabilities(
                                   texts, show_progress=False), atol=1e-6)


def test_an_export_refuses_an_incomplete_directory_and_its_own_source(tmp_path, tiny_lora_classifier, capsys):
    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert METADATA_FILE in capsys.readouterr().err
    assert main([str(tiny_lora_classifier), str(tiny_lora_classifier)]) == 2
    assert "a directory of its own" in capsys.readouterr().err


def test_a_qlora_adapter_is_merged_into_a_full_precision_copy_of_its_base(tiny_phi3, toy_files, tmp_path):
    """Merging into 4-bit weights would round the update away: the export holds the full-precision
    base with the adapter folded in, so it equals that base running the adapter beside it."""
    from peft import PeftModel

    from safety_classifier.artifacts import load_classifier_model, read_metadata

    output_dir = tmp_path / "qlora"
    assert train_main("qlora", fast_training_flags(tiny_phi3, toy_files, output_dir, "--lora-r", "4")) == 0
    export_dir = tmp_path / "export"
    assert main([str(output_dir), str(export_dir)]) == 0
    exported = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    assert all(parameter.dtype == torch.float32 for parameter in exported.parameters())

    metadata = {**read_metadata(output_dir), "quantization": None}
    beside, tokenizer = load_classifier_model(output_dir, metadata, device=torch.device("cpu"), dtype="fp32",
                                              merge_adapters=False)
    assert isinstance(beside, PeftModel)
    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()[:8]
    padded = tokenizer.pad({"input_ids": encode_prompts(tokenizer, texts, 64)}, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(exported(**padded).logits, beside(**padded).logits, atol=1e-5, rtol=0)
