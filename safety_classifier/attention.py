"""Attention for training on a CPU: plain matrix products for short batches, SDPA for long ones.

PyTorch's CPU SDPA (its flash-attention kernel) has a cost per call that dominates short
sequences, in the backward pass above all, while transformers' "eager" attention (matmul,
softmax, matmul) grows with the square of the length (`benchmarks/profile_step.py --lengths`
compares them; docs/performance.md has the figures). Most training batches are short, so
`TRAINING_ATTENTION` picks per call: eager up to `EAGER_MAX_KEYS` keys, SDPA above. On a GPU, SDPA's fused kernels
win at every length, and nothing changes there.

It is registered with transformers' `AttentionInterface`, so any model that dispatches through it
(Llama, Phi-3, Qwen and most current decoders) can use it; `use_training_attention` switches a
model for training. transformers does not write the attention implementation into `config.json`,
so a saved classifier loads with the library's default as before.
"""

from __future__ import annotations

import torch
from torch import nn

TRAINING_ATTENTION = "sdpa_long_eager_short"
EAGER_MAX_KEYS = 320
"""Longest key sequence computed with eager attention, a little below where it stops gaining."""


def short_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, computed as eager attention where the sequence is short.

    Takes SDPA's boolean mask (True: attend) or none (causal, no padding), as registered below.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    query_length, key_length = query.shape[-2], key.shape[-2]
    if key_length > EAGER_MAX_KEYS or query_length != key_length or kwargs.get("cu_seq_lens_q") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is None:  # SDPA's mask builder skips it for causal attention without padding
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device).tril()
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # an additive float mask: 0 where a key is attended
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = scores.masked_fill(~attention_mask[..., :key_length], torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def backbone_owner(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself), whose config names the attention."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def register_attention(name: str, function) -> None:
    """`function` as transformers' attention `name`, given SDPA's masks (boolean, or none where causal suffices)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def switch_from_sdpa(model: nn.Module, name: str, function) -> bool:
    """Switch a model that runs SDPA to `function`, registered as `name`; True if switched. A model on
    another attention, or of a class that cannot switch, stays as it was."""
    owner = backbone_owner(model)
    config = getattr(owner, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register_attention(name, function)
    try:
        owner.set_attn_implementation(name)
    except Exception:  # a model class that cannot switch: stays on SDPA
        return False
    return config._attn_implementation == name


def use_training_attention(model: nn.Module) -> bool:
    """Switch a model that runs SDPA, to be trained on a CPU, to `TRAINING_ATTENTION`; True if switched."""
    return switch_from_sdpa(model, TRAINING_ATTENTION, short_eager_attention)
