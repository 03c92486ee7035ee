"""The saved classifier directory: write it so it appears complete or not at all, load it safely.

Layout (OUTPUT_DIR):
- adapters (LoRA, QLoRA): `adapter_config.json`, `adapter_model.safetensors` (LoRA weights and
  the head); full weights (top-N, merged): `config.json`, `model.safetensors`;
- the tokenizer files;
- `safety_classifier.json`: threshold, calibration, labels (and categories with their thresholds;
  with responses, the response template and threshold), base-model reference, training arguments.
  It is written last, by an atomic rename, and is the mark of a complete directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .categories import category_score_rule_of
from .embedded import EMBEDDED_ALIAS, resolve_model_reference
from .errors import ModelLoadError
from .labels import LabelSchema
from .modeling import load_sequence_classifier, load_tokenizer, resolve_dtype

METADATA_FILE = "safety_classifier.json"
FORMAT_VERSION = 7
"""2: a stored `calibration` of P(unsafe), to which the threshold applies. A toolkit that reads only 1
would ignore it and compare raw scores with a calibrated threshold, so it must refuse; this one
reads 1 (no calibration: softmax[:, 1], as before) and 2. 3: `categories` (a category head); a
binary classifier is still written as 2, so that toolkits reading 2 keep loading it. 4:
`category_score_rule` "joint" (category scores times P(unsafe), `categories.py`), whose thresholds a
toolkit reading 3 would compare with the head's bare sigmoids; a "conditional" one is still 3. 5: a
`category_route_threshold` (a second route to unsafe, `categories.py`), which a toolkit reading 4
would ignore; a classifier without one keeps its earlier number. 6: a `prompt_template` the texts
are read in (`formatting.py`), which a toolkit reading 5 would not apply; without one, the number
of the features above. 7: `responses` (trained on answers with their prompts, read in its
`response_template`, with a `response_threshold` of their own), which a toolkit reading 6 would
encode as bare prompts; a classifier trained on prompts alone keeps its earlier number."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_json_atomically(path: Path, payload: object) -> None:
    """Write next to the target and rename over it: readers see the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def portable_base_reference(model_reference: str) -> str:
    """What a different machine can resolve: the embedded alias, a hub id, or an absolute path."""
    if model_reference == EMBEDDED_ALIAS:
        return model_reference
    path = Path(model_reference)
    return str(path.resolve()) if path.exists() else model_reference


def write_metadata(directory: Path, metadata: dict) -> None:
    if not metadata.get("categories"):
        version = 2
    else:
        version = 3 if category_score_rule_of(metadata) == "conditional" else 4
        if metadata.get("category_route_threshold") is not None:
            version = 5  # older readers would drop the route and call fewer texts unsafe
    if metadata.get("prompt_template") is not None:
        version = 6  # older readers would score the bare texts
    if metadata.get("responses"):
        version = FORMAT_VERSION  # older readers would read a pair as a prompt
    write_json_atomically(directory / METADATA_FILE, {**metadata, "format_version": version})


def save_classifier_files(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path, metadata: dict
) -> None:
    """Weights in safetensors, tokenizer, then the metadata file (last)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_metadata(directory, metadata)


def publish_directory(staging: Path, target: Path) -> None:
    """Move a complete classifier from `staging` into `target`, the metadata file last.

    Until the metadata lands, `target` has no METADATA_FILE and loaders refuse it; files of an
    earlier classifier that the new one does not have are removed so the two never mix.
    """
    target.mkdir(parents=True, exist_ok=True)
    (target / METADATA_FILE).unlink(missing_ok=True)
    new_names = {path.name for path in staging.iterdir()}
    for stale in _classifier_files(target):
        if stale.name not in new_names:
            stale.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == METADATA_FILE):
        destination = target / path.name
        if destination.is_dir():
            shutil.rmtree(destination)
        os.replace(path, destination)
    staging.rmdir()


def _classifier_files(directory: Path) -> list[Path]:
    patterns = ("adapter_*", "*.safetensors", "*.safetensors.index.json", "config.json", "tokenizer*",
                "special_tokens_map.json", "chat_template.*", "vocab.json", "merges.txt", "generation_config.json")
    return sorted({path for pattern in patterns for path in directory.glob(pattern) if path.is_file()})


def read_metadata(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: no such classifier directory")
    path = directory / METADATA_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{directory} is not a complete classifier directory: {METADATA_FILE} is missing "
            f"(the training run did not finish, or this directory was not written by this toolkit)"
        )
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from error
    missing = [key for key in ("format_version", "adapter", "base_model", "threshold", "max_length") if key not in metadata]
    if missing:
        raise ModelLoadError(f"{path}: missing key(s) {', '.join(missing)}")
    if metadata["format_version"] > FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format version {metadata['format_version']} is newer than this toolkit reads")
    return metadata


def load_classifier_model(
    directory: str | Path,
    metadata: dict,
    *,
    device: torch.device,
    dtype: str = "auto",
    base_model: str | None = None,
    trust_remote_code: bool = False,
    merge_adapters: bool = True,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Rebuild the model and tokenizer of a classifier directory, weights through safetensors only.

    LoRA adapters are merged into the base weights for scoring (`merge_adapters=False` keeps the
    `PeftModel`); an NF4 backbone keeps them apart, as merging would re-quantise its weights.
    """
    directory = Path(directory)
    tokenizer = load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype, device)
    quantized = metadata.get("quantization") == "nf4"
    schema = LabelSchema.from_metadata(metadata)
    if metadata["adapter"]:
        from peft import PeftModel

        if not (directory / ADAPTER_WEIGHTS).is_file():
            pickled = [p.name for p in directory.glob("adapter_model.bin")]
            raise ModelLoadError(
                f"{directory}: {ADAPTER_WEIGHTS} is missing"
                + (f" (found pickle-only {pickled[0]}, which is refused: it can run code when loaded)" if pickled else "")
            )
        reference = base_model or metadata["base_model"]
        base_path = resolve_model_reference(reference)
        if base_path.startswith(("/", "./", "../")) and not Path(base_path).exists():
            raise ModelLoadError(
                f"the base model {base_path} of {directory} is not on this machine; pass --base-model "
                f"with a hub id or a local copy of it"
            )
        model = load_sequence_classifier(base_path, tokenizer, torch_dtype, trust_remote_code, quantize_4bit=quantized,
                                         schema=schema)
        model = PeftModel.from_pretrained(model, directory)
        if merge_adapters and not quantized:
            # A pass then runs the base model alone, without some 200 small adapter products on
            # the side; scores agree to rounding.
            model = model.merge_and_unload()
    else:
        model = load_sequence_classifier(str(directory), tokenizer, torch_dtype, trust_remote_code, schema=schema)
    if not quantized:
        model.to(device)
    model.eval()
    return model, tokenizer
