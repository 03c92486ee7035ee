"""Export a classifier as a plain Hugging Face sequence-classification directory.

The export holds full weights (LoRA adapters merged; a QLoRA adapter merged into a full-precision
copy of its base, since merging into 4-bit weights would round the update away), the tokenizer, and
a `config.json` that carries what a verdict needs besides the logits under `safety_classifier`:
the calibration of P(unsafe), the decision threshold, the categories with their thresholds, the
templates texts are read in. `AutoModelForSequenceClassification.from_pretrained` loads it and
gives the logits the toolkit scores with, and an engine that serves sequence classifiers (vLLM's
pooling runner) can serve it as it is. It also keeps `safety_classifier.json`, so `infer.py` and
`serve.py` read it like any classifier directory.

    python -m safety_classifier.export runs/lora runs/lora-export
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .artifacts import load_classifier_model, publish_directory, read_metadata, save_classifier_files
from .errors import SafetyClassifierError

CONFIG_KEY = "safety_classifier"
_VERDICT_KEYS = ("threshold", "threshold_rule", "calibration", "categories", "category_score_rule",
                 "category_route_threshold", "prompt_template", "responses", "response_template", "response_threshold",
                 "max_length", "labels")


def verdict_config(metadata: dict) -> dict:
    """What turns logits into a verdict, as stored in the export's config.json."""
    return {key: metadata[key] for key in _VERDICT_KEYS if metadata.get(key) is not None}


def write_export(model: nn.Module, tokenizer: PreTrainedTokenizerBase, metadata: dict, directory: Path) -> None:
    """Full weights of `model` (a `PeftModel` is merged first) with the verdict in its config,
    published so that `directory` appears complete or not at all."""
    from peft import PeftModel

    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged.config.pad_token_id = tokenizer.pad_token_id  # a base config may define none
    setattr(merged.config, CONFIG_KEY, verdict_config(metadata))
    staging = directory.with_name(directory.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    save_classifier_files(merged, tokenizer, staging, {**metadata, "adapter": False, "quantization": None,
                                                       "strategy": metadata["strategy"].removesuffix("+merged") + "+merged"})
    publish_directory(staging, directory)


def export_classifier(model_dir: str | Path, output_dir: str | Path, *, dtype: str = "fp32", base_model: str | None = None,
                      trust_remote_code: bool = False) -> Path:
    """Load the classifier in `model_dir` in full precision, merge its adapters, write the export."""
    metadata = read_metadata(model_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == Path(model_dir).resolve():
        raise SafetyClassifierError(f"{output_dir}: the export needs a directory of its own")
    # A QLoRA adapter loads onto the full-precision base here, so its update merges unrounded.
    full_precision = {**metadata, "quantization": None}
    model, tokenizer = load_classifier_model(model_dir, full_precision, device=torch.device("cpu"), dtype=dtype,
                                             base_model=base_model, trust_remote_code=trust_remote_code)
    write_export(model, tokenizer, metadata, output_dir)
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a classifier as a plain Hugging Face sequence-classification "
                                                 "directory (adapters merged, the verdict's settings in config.json).")
    parser.add_argument("model_dir", help="a classifier directory written by a train_*.py script")
    parser.add_argument("output_dir", help="where the export lands")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the exported weights")
    parser.add_argument("--base-model", default=None, help="override the adapter's base model reference")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the base model")
    args = parser.parse_args(argv)
    from .console import quiet_library_noise

    quiet_library_noise()
    try:
        directory = export_classifier(args.model_dir, args.output_dir, dtype=args.dtype, base_model=args.base_model,
                                      trust_remote_code=args.trust_remote_code)
    except SafetyClassifierError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported to {directory}: AutoModelForSequenceClassification.from_pretrained({str(directory)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
