"""Frozen-prefix caching for the top-N strategy and for LoRA on the top K blocks.

With `freeze_all_but_top_layers(model, N)`, or LoRA adapters on the top N blocks only
(`--lora-layers top:N`), the embeddings and the bottom L-N transformer blocks never change, so the
hidden states entering block L-N are the same in every epoch. This module computes them once
(`prefix_hidden_states_from_ids`) and trains only the top of the network on them
(`TopLayersOnCachedPrefix`), which turns every epoch after the first from L blocks of forward
(and N of backward) into N blocks of forward and backward. A PEFT model is read through its
underlying transformers model, whose top blocks hold the adapters in place.

How the two halves are run: both call the model's own backbone forward (`model.base_model`), with
its block list temporarily replaced by a slice of itself, so that the architecture's own code
still builds the causal / sliding-window mask, the rotary position embeddings and the per-layer
attention types:

* prefix: blocks ``[0, L-N)``, the final norm replaced by ``nn.Identity``, fed ``input_ids``;
* top: blocks ``[L-N, L)`` and the real final norm, fed the cached states as ``inputs_embeds``
  (which skips the embedding layer, including Gemma's scaled embedding).

Why this is exact with right padding (the toolkit's tokenizers pad on the right):

* position ids are ``arange(seq_len)`` for every row (transformers 5 Llama/Phi-3/Qwen2/Gemma
  backbones build them that way when none are given), so a real token at index t gets rotary
  position t in both halves whatever the padded length of its batch;
* the mask is causal plus padding; with right padding a real token only ever attends to earlier
  real tokens, so neither the pad tokens' states in the full model nor the zeros that the collator
  puts in their place here can reach a real token, and the pooled last real token is identical;
* ``config.layer_types`` (per-layer full / sliding attention, Qwen2 and others) is sliced together
  with the blocks, because those backbones index it by the block's position in the loop.

Limits: rotary scalings that depend on the padded sequence length (Phi-3 "longrope" beyond
``original_max_position_embeddings``, "dynamic" NTK) choose their factors per *batch*, so rows
longer than that threshold can differ between the cached and the uncached path, as they already
differ between batchings in the uncached path. Left padding is not supported (the positions
would shift); use the toolkit's `load_tokenizer`, which pads on the right.

Memory: the cache holds ``sum(real tokens) x hidden_size x bytes(dtype)``; it is stored in the
model's dtype (bf16 halves it). `prefix_hidden_states_from_ids` estimates the size from the token
counts before running anything and raises `PrefixCacheTooLarge` above ``max_cache_bytes``
(`DEFAULT_MAX_CACHE_BYTES` by default), so that a run fails before the cache fills the memory;
call it with a larger budget or train uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from tqdm.auto import tqdm
from transformers.modeling_outputs import SequenceClassifierOutput

from .batching import default_batch_tokens, device_scoring_batches
from .modeling import find_final_norm, find_head_name, find_transformer_blocks, unwrap_adapters

DEFAULT_MAX_CACHE_BYTES = 4 * 1024**3


class PrefixCacheTooLarge(ValueError):
    """The cached hidden states would exceed the allowed memory."""


# --------------------------------------------------------------------------------------------
# Locating and temporarily slicing the backbone
# --------------------------------------------------------------------------------------------


@dataclass
class _BackboneParts:
    backbone: nn.Module
    blocks_name: str
    blocks: nn.ModuleList
    norm_name: str | None
    norm: nn.Module | None
    head: nn.Module


def _backbone_parts(model: nn.Module) -> _BackboneParts:
    model = unwrap_adapters(model)
    backbone = model.base_model
    if backbone is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (base_model); cannot cache a prefix")
    blocks = find_transformer_blocks(model)
    blocks_name = next((name for name, child in backbone.named_children() if child is blocks), None)
    if blocks_name is None:
        raise ValueError(
            f"the transformer blocks of {type(model).__name__} are not a direct child of its backbone; "
            "prefix caching supports Llama-style backbones (Llama, Phi-3, Qwen2, Gemma, ...)"
        )
    norm_name, norm = find_final_norm(model) or (None, None)
    head = getattr(model, find_head_name(model))
    return _BackboneParts(backbone, blocks_name, blocks, norm_name, norm, head)


@contextlib.contextmanager
def _sliced_backbone(parts: _BackboneParts, start: int, stop: int, keep_norm: bool) -> Iterator[nn.Module]:
    """The backbone running only blocks [start, stop) (and the final norm only if `keep_norm`)."""
    backbone = parts.backbone
    config = backbone.config
    layer_types = getattr(config, "layer_types", None)
    sliced_types = isinstance(layer_types, (list, tuple)) and len(layer_types) == len(parts.blocks)
    setattr(backbone, parts.blocks_name, nn.ModuleList(list(parts.blocks)[start:stop]))
    if parts.norm_name and not keep_norm:
        setattr(backbone, parts.norm_name, nn.Identity())
    if sliced_types:
        config.layer_types = list(layer_types)[start:stop]
    try:
        yield backbone
    finally:
        setattr(backbone, parts.blocks_name, parts.blocks)
        if parts.norm_name:
            setattr(backbone, parts.norm_name, parts.norm)
        if sliced_types:
            config.layer_types = layer_types


def _prefix_stop(parts: _BackboneParts, num_layers: int) -> int:
    total = len(parts.blocks)
    if not 0 <= num_layers <= total:
        raise ValueError(f"num_layers must be between 0 and {total} for this model, not {num_layers}")
    return total - num_layers


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """The index the model's own sequence-classification forward pools: the rightmost token that is
    not the pad id (`GenericForSequenceClassification` in transformers 5); -1 without a pad id."""
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


# --------------------------------------------------------------------------------------------
# Computing the cache
# --------------------------------------------------------------------------------------------


def estimate_cache_bytes(lengths: Sequence[int], hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of the cached states: one [length, hidden] tensor per row, no padding."""
    return int(sum(int(n) for n in lengths)) * int(hidden_size) * torch.empty((), dtype=dtype).element_size()


def _hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def _storage_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def check_cache_size(model: nn.Module, lengths: Sequence[int], max_cache_bytes: int | None) -> None:
    """Raise `PrefixCacheTooLarge` when states of rows this long would take more than `max_cache_bytes`
    (None: no limit)."""
    model = unwrap_adapters(model)
    dtype, hidden = _storage_dtype(model), _hidden_size(model)
    estimate = estimate_cache_bytes(lengths, hidden, dtype)
    if max_cache_bytes is not None and estimate > max_cache_bytes:
        raise PrefixCacheTooLarge(
            f"the prefix cache would take {estimate / 2**20:,.0f} MiB ({int(sum(int(n) for n in lengths)):,} tokens x "
            f"{hidden} x {str(dtype).replace('torch.', '')}), over the limit of "
            f"{max_cache_bytes / 2**20:,.0f} MiB; raise max_cache_bytes, shorten max_length or train uncached"
        )


# Configuration keys that name or label a model without changing what its prefix computes.
_CONFIG_KEYS_IGNORED = {
    "_name_or_path", "architectures", "id2label", "label2id", "num_labels", "problem_type",
    "transformers_version", "torch_dtype", "dtype", "safety_classifier", "auto_map", "_attn_implementation",
    "_attn_implementation_autoset",
}


def prefix_fingerprint(model: nn.Module, num_layers: int) -> str:
    """SHA-256 (hex) of everything the states entering the top `num_layers` blocks depend on."""
    model = unwrap_adapters(model)
    parts = _backbone_parts(model)
    stop = _prefix_stop(parts, num_layers)
    above = {id(tensor) for block in list(parts.blocks)[stop:] for tensor in (*block.parameters(), *block.buffers())}
    if parts.norm is not None:
        above |= {id(tensor) for tensor in (*parts.norm.parameters(), *parts.norm.buffers())}
    config = {key: value for key, value in model.config.to_dict().items() if key not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256()
    digest.update(json.dumps([type(parts.backbone).__name__, stop, str(_storage_dtype(model)), config],
                             sort_keys=True, default=str).encode())
    named = [*parts.backbone.named_parameters(), *parts.backbone.named_buffers()]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if id(tensor) in above:
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def prefix_hidden_states_from_ids(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    num_layers: int,
    *,
    pad_token_id: int,
    max_batch_tokens: int | None = None,
    max_cache_bytes: int | None = DEFAULT_MAX_CACHE_BYTES,
    show_progress: bool = False,
    description: str = "caching frozen prefix",
) -> list[torch.Tensor]:
    """Hidden states entering the top `num_layers` blocks, one [length, hidden] tensor per row of token ids.

    Runs the embeddings and the frozen bottom blocks once, in inference mode, in length-sorted
    batches of at most `max_batch_tokens` padded tokens (`batching.device_scoring_batches`).
    Tensors are unpadded, on the CPU, in the model's dtype, and returned in the order of
    `input_ids`. Raises `PrefixCacheTooLarge` when they would take more than `max_cache_bytes`
    (None: no limit).
    """
    lengths = np.asarray([len(ids) for ids in input_ids], dtype=np.int64)
    if len(lengths) and lengths.min() == 0:
        raise ValueError("rows without tokens cannot be cached")
    check_cache_size(model, lengths, max_cache_bytes)

    def batch_inputs(batch: np.ndarray, longest: int) -> dict[str, torch.Tensor]:
        ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : lengths[index]] = torch.as_tensor(input_ids[index], dtype=torch.long)
        return {"input_ids": ids}

    parts = _backbone_parts(model)
    return _run_blocks(model, parts, lengths, batch_inputs, 0, _prefix_stop(parts, num_layers),
                       max_batch_tokens=max_batch_tokens, show_progress=show_progress, description=description)


def continue_prefix_states(
    model: nn.Module,
    states: Sequence[torch.Tensor],
    from_num_layers: int,
    num_layers: int,
    *,
    max_batch_tokens: int | None = None,
    show_progress: bool = False,
    description: str = "continuing frozen prefix",
) -> list[torch.Tensor]:
    """States entering the top `num_layers` blocks from those entering the top `from_num_layers`
    (a shallower prefix of the same frozen weights): only the blocks in between are run, fed the
    states as `inputs_embeds` as `TopLayersOnCachedPrefix` feeds its blocks."""
    if not num_layers < from_num_layers:
        raise ValueError(f"a prefix continues upwards: num_layers ({num_layers}) must be below {from_num_layers}")
    lengths = np.asarray([len(state) for state in states], dtype=np.int64)

    def batch_inputs(batch: np.ndarray, longest: int) -> dict[str, torch.Tensor]:
        embeds = torch.zeros((len(batch), longest, states[batch[0]].shape[-1]), dtype=states[batch[0]].dtype)
        for row, index in enumerate(batch):
            embeds[row, : lengths[index]] = states[index]
        return {"inputs_embeds": embeds}

    parts = _backbone_parts(model)
    return _run_blocks(model, parts, lengths, batch_inputs, _prefix_stop(parts, from_num_layers),
                       _prefix_stop(parts, num_layers), max_batch_tokens=max_batch_tokens,
                       show_progress=show_progress, description=description)


def _run_blocks(model: nn.Module, parts: _BackboneParts, lengths: np.ndarray, batch_inputs, start: int, stop: int, *,
                max_batch_tokens: int | None, show_progress: bool, description: str) -> list[torch.Tensor]:
    """Blocks [start, stop) over length-sorted right-padded batches (`batch_inputs(batch, longest)`
    gives the padded ids or states), in inference mode; unpadded CPU tensors in the storage dtype."""
    dtype = _storage_dtype(unwrap_adapters(model))
    device = next(model.parameters()).device
    max_batch_tokens = max_batch_tokens or default_batch_tokens(device)
    states: list[torch.Tensor | None] = [None] * len(lengths)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(lengths), desc=description, unit="prompt", disable=not show_progress)
    try:
        for batch in device_scoring_batches(lengths, max_batch_tokens, device):
            longest = int(lengths[batch].max())
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, index in enumerate(batch):
                mask[row, : lengths[index]] = 1
            inputs = {name: tensor.to(device) for name, tensor in batch_inputs(batch, longest).items()}
            with torch.inference_mode(), _sliced_backbone(parts, start, stop, keep_norm=False) as backbone:
                hidden = backbone(**inputs, attention_mask=mask.to(device), use_cache=False).last_hidden_state
            # Cloned outside inference mode: ordinary tensors that autograd may save later.
            for row, index in enumerate(batch):
                states[index] = hidden[row, : lengths[index]].to(device="cpu", dtype=dtype).clone()
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return states  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Training on the cache
# --------------------------------------------------------------------------------------------


class TopLayersOnCachedPrefix(nn.Module):
    """The top `num_layers` blocks, the final norm and the head of `model`, fed cached states.

    The modules are the model's own (shared, not copied): training this wrapper trains `model`
    (a PEFT model: its adapters and head), which is then saved as usual
    (`wrapper.classifier.save_pretrained(...)`). Only those modules are registered, so
    `parameters()` holds exactly the top; the frozen embeddings and bottom blocks stay in `model`
    but are not run. `state_dict()` holds the trainable parameters only (what a checkpoint must
    restore: the frozen rest is the base model's), and `load_state_dict` loads them back. `.to()` /
    `.float()` etc. are applied to the whole model so that the backbone's buffers (rotary
    frequencies) follow.

    `forward(hidden_states, attention_mask, labels=None, input_ids=None)`: hidden_states is the
    right-padded [batch, seq, hidden] cache (zeros at pads), attention_mask marks real tokens.
    The row's logits are read, like the model's own forward, at the rightmost token that is not
    the pad id when `input_ids` is given, else at the last position the mask marks as real.
    """

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        parts = _backbone_parts(model)
        self._start = _prefix_stop(parts, num_layers)
        self._parts = [parts]  # a list: not registered as a submodule
        self._classifier = [model]
        self.num_layers = num_layers
        self.config = unwrap_adapters(model).config
        self.top_blocks = nn.ModuleList(list(parts.blocks)[self._start :])
        self.norm = parts.norm if parts.norm is not None else nn.Identity()
        self.head = parts.head

    @property
    def classifier(self) -> nn.Module:
        """The full sequence-classification model whose top this wrapper trains."""
        return self._classifier[0]

    def _apply(self, fn, recurse=True):
        self.classifier._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        self.classifier.train(mode)
        return super().train(mode)

    def _trained_parameters(self) -> dict[str, nn.Parameter]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        # A LoRA top's frozen base weights (NF4 ones included) would only bloat every checkpoint.
        state = destination if destination is not None else OrderedDict()
        for name, parameter in self._trained_parameters().items():
            state[prefix + name] = parameter if keep_vars else parameter.detach()
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        trained = self._trained_parameters()
        missing = [name for name in trained if name not in state_dict]
        unexpected = [name for name in state_dict if name not in trained]
        if strict and (missing or unexpected):
            raise RuntimeError(f"checkpoint of the trained top: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in trained:
                    trained[name].copy_(value)
        return _IncompatibleKeys(missing, unexpected)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        parts = self._parts[0]
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        stop = len(parts.blocks)
        with _sliced_backbone(parts, self._start, stop, keep_norm=True) as backbone:
            last = backbone(inputs_embeds=hidden_states, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = self.head(last)
        if input_ids is not None:
            pool = last_non_pad_index(input_ids.to(logits.device), self.config.pad_token_id)
        else:
            positions = torch.arange(attention_mask.shape[-1], device=logits.device)
            pool = (positions * (attention_mask.to(logits.device) != 0)).argmax(-1)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), pool]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(pooled.float().view(-1, pooled.shape[-1]), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=pooled)


class CachedPrefixDataset(torch.utils.data.Dataset):
    """Cached states and labels (and, optionally, the token ids they came from).

    Items are dicts: `hidden_states` ([seq, hidden]), `labels` (an int; with a category head, a
    list of floats: the binary label, then the category targets) and, with ids, `input_ids`
    (used for pooling like the model does, and by `Trainer`'s group_by_length sampler).
    """

    def __init__(self, states: Sequence[torch.Tensor], labels: Sequence[int] | Sequence[Sequence[float]],
                 input_ids: Sequence[Sequence[int]] | None = None):
        if len(states) != len(labels) or (input_ids is not None and len(input_ids) != len(states)):
            raise ValueError("states, labels and input_ids must have one entry per row")
        self.states = list(states)
        self.labels = [[float(v) for v in label] if isinstance(label, (list, tuple)) else int(label) for label in labels]
        self.input_ids = [list(ids) for ids in input_ids] if input_ids is not None else None

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> dict:
        item = {"hidden_states": self.states[index], "labels": self.labels[index]}
        if self.input_ids is not None:
            item["input_ids"] = self.input_ids[index]
        return item

    @property
    def nbytes(self) -> int:
        return sum(state.numel() * state.element_size() for state in self.states)


@dataclass
class CachedPrefixCollator:
    """Right-pads a batch of cached states with zeros and builds the attention mask.

    Input ids, when the items carry them, are padded with `pad_token_id`.
    """

    pad_token_id: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        lengths = [int(feature["hidden_states"].shape[0]) for feature in features]
        longest = max(lengths)
        first = features[0]["hidden_states"]
        hidden = first.new_zeros((len(features), longest, first.shape[-1]))
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            hidden[row, :length] = feature["hidden_states"]
            mask[row, :length] = 1
        batch = {"hidden_states": hidden, "attention_mask": mask}
        if "input_ids" in features[0]:
            pad = self.pad_token_id if self.pad_token_id is not None else 0
            ids = torch.full((len(features), longest), pad, dtype=torch.long)
            for row, (feature, length) in enumerate(zip(features, lengths)):
                ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            batch["input_ids"] = ids
        if "labels" in features[0]:
            labels = [feature["labels"] for feature in features]
            batch["labels"] = (torch.as_tensor(labels, dtype=torch.float32) if isinstance(labels[0], list)
                               else torch.as_tensor([int(label) for label in labels], dtype=torch.long))
        return batch


__all__ = [
    "DEFAULT_MAX_CACHE_BYTES",
    "CachedPrefixCollator",
    "CachedPrefixDataset",
    "PrefixCacheTooLarge",
    "TopLayersOnCachedPrefix",
    "check_cache_size",
    "continue_prefix_states",
    "estimate_cache_bytes",
    "last_non_pad_index",
    "prefix_fingerprint",
    "prefix_hidden_states_from_ids",
]
