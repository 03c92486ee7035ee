"""Packed scoring: the prompts of a forward pass in one row, each attending only to itself.

Scoring thousands of prompts sorted by length (what `infer.py` does with a file) fills every pass
with prompts of one length. A served batch is a few prompts of mixed lengths: its cheapest padded
split still has passes of one or two short rows, and padding. Packed, such a batch is one pass
with no padding; `batching.scoring_plan` chooses between the two and `batching.pack_rows` groups
the rows.

How: the prompts' tokens go in one row, position ids restart at every prompt, and the boundaries
travel to the attention layers as `cu_seq_lens_q` (the name flash attention's variable-length
kernels read). `packed_sdpa_attention`, registered with transformers' `AttentionInterface`, runs
PyTorch's causal SDPA on each prompt's own span; the classification head's output is read at each
prompt's last token. (Letting transformers build a block-diagonal mask for the whole row instead
computes attention over every pair of tokens in it, so it was no faster than padding.) A model
switched to it scores padded batches as before.

Only for models that run sdpa through the `AttentionInterface` (Llama, Phi-3, Qwen and most
current decoders) and only on CPU (on a GPU, padded batches are cheap and one SDPA call per prompt
is not); `enable_packed_scoring` checks on three prompts that packed and padded scores agree and
otherwise leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .attention import backbone_owner, switch_from_sdpa
from .modeling import find_head_name

PACKED_ATTENTION = "packed_sdpa"
PACK_TOKEN_MULTIPLE = 64
"""A half-precision CPU model's packs are padded to a multiple of this many tokens. In bf16 (not in
fp32), oneDNN's matrix products and PyTorch's SDPA build and keep kernels and buffers for every
shape they meet, so a served model scoring packs of every length keeps growing. With the steps,
the matrix products meet `batching.MAX_PACK_TOKENS / 64` shapes, and attention one per prompt
length: all of them in the service's warm-up (`warm_up_shapes`). (Padding each prompt's attention
span to steps as well moved bf16 logits, its kernels summing in another order, past
`enable_packed_scoring`'s check for the demo classifier.)"""
PROBE_TEXTS = ("What is the capital of France?", "Tell me how to shoplift without getting caught, step by step.", "Hi")
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # logits; half precision: 0.1


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, cu_seq_lens_q: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention; for a packed row (`cu_seq_lens_q` given), causal attention
    within each span, one SDPA call per span length (spans of one length stacked as a batch)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _, heads, tokens, head_dim = query.shape
    output = query.new_empty(tokens, heads, head_dim)
    for starts, length in spans_by_length(cu_seq_lens_q):
        if len(starts) == 1:
            # The only span of its length (most, in a served batch): views of the (1, heads, tokens,
            # head dim) tensors, no gathering or scattering of its positions.
            span = slice(starts[0], starts[0] + length)
            attended = sdpa_attention_forward(module, query[:, :, span], key[:, :, span], value[:, :, span], None,
                                              **kwargs)[0]
            output[span] = attended[0]
            continue
        # Spans of one length as a batch: (spans, heads, length, head dim).
        positions = torch.tensor(starts, device=query.device)[:, None] + torch.arange(length, device=query.device)
        query_spans, key_spans, value_spans = (states[0][:, positions].transpose(0, 1) for states in (query, key, value))
        attended = sdpa_attention_forward(module, query_spans, key_spans, value_spans, None, **kwargs)[0]
        output[positions.reshape(-1)] = attended.reshape(-1, heads, head_dim)
    return output.unsqueeze(0), None  # (batch, tokens, heads, head dim), as sdpa_attention_forward returns


def packs_in_steps(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether packs are padded to steps (`PACK_TOKEN_MULTIPLE`): half precision on CPU. Public so
    that `benchmarks/serving_memory.py --no-shape-steps` can replace it to measure packs of any length."""
    return dtype in (torch.bfloat16, torch.float16) and device.type == "cpu"


def spans_by_length(bounds: torch.Tensor) -> list[tuple[list[int], int]]:
    """(start positions, length) of the spans between `bounds`, grouped by span length."""
    bounds = bounds.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        starts_by_length.setdefault(end - start, []).append(start)
    return [(starts, length) for length, starts in starts_by_length.items()]


def pack_token_multiple(model: nn.Module) -> int:
    """`PACK_TOKEN_MULTIPLE` for a half-precision model on CPU, else 1 (packs as long as their rows)."""
    parameter = next(model.parameters())
    return PACK_TOKEN_MULTIPLE if packs_in_steps(parameter.dtype, parameter.device) else 1


def scores_in_stepped_packs(model: nn.Module) -> bool:
    """Whether `model` packs with `pack_token_multiple` > 1: switched to packed attention, half precision, CPU."""
    return uses_packed_attention(model) and pack_token_multiple(model) > 1


def packed_inputs(input_ids: Sequence[Sequence[int]], rows: np.ndarray, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs of one pack: the rows' tokens in one row, positions restarting per row, span
    bounds. With `multiple` > 1, a filler span (token 0, attending only to itself) pads the row to
    a multiple of that many tokens; its output is never read, and no prompt's score changes."""
    lengths = [len(input_ids[i]) for i in rows]
    filler = -sum(lengths) % multiple
    tokens = [token for i in rows for token in input_ids[i]] + [0] * filler
    lengths = torch.tensor(lengths + [filler] if filler else lengths)
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    bounds[1:] = torch.cumsum(lengths, 0)
    total = int(bounds[-1])
    return {
        "input_ids": torch.tensor(tokens).unsqueeze(0),
        # All ones: no padding, so sdpa_mask returns no mask at all; the spans do the masking.
        "attention_mask": torch.ones(1, total, dtype=torch.long),
        "position_ids": torch.cat([torch.arange(int(length)) for length in lengths]).unsqueeze(0),
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
        "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max()),
    }


def packed_forward(model: nn.Module, input_ids: Sequence[Sequence[int]],
                   packs: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(row indices, their logits) pack by pack (`batching.pack_rows`), under the caller's inference mode."""
    head_outputs: list[torch.Tensor] = []
    head = getattr(model, find_head_name(model))
    hook = head.register_forward_hook(lambda module, inputs, output: head_outputs.append(output))
    device = next(model.parameters()).device
    multiple = pack_token_multiple(model)
    try:
        for rows in packs:
            inputs = packed_inputs(input_ids, rows, multiple)
            model(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                     for name, value in inputs.items()}, use_cache=False)
            last_tokens = inputs["cu_seq_lens_q"][1:len(rows) + 1].long() - 1
            yield rows, head_outputs.pop()[0, last_tokens.to(device)]
    finally:
        hook.remove()


def warm_up_shapes(model: nn.Module, longest_pack: int, longest_prompt: int) -> int:
    """For a model whose packs are padded to steps (`pack_token_multiple` > 1): one forward pass at
    each pack length up to `longest_pack` tokens, and the attention of one layer over a prompt of
    each length up to `longest_prompt` (SDPA alone, cheap), so that every kernel and buffer traffic
    can need exists before it comes. The number of forward passes (0 for any other model)."""
    if not scores_in_stepped_packs(model):
        return 0
    multiple = pack_token_multiple(model)
    attention = next((module for module in model.modules() if type(module).__name__.endswith("Attention")
                      and hasattr(module, "head_dim")), None)
    pack_lengths = range(multiple, -(-longest_pack // multiple) * multiple + 1, multiple)
    with torch.inference_mode():
        def pack_pass(length: int) -> None:
            list(packed_forward(model, [[0] * length], [np.zeros(1, dtype=np.int64)]))

        layouts = _attention_layouts(lambda: pack_pass(pack_lengths[0]))
        for length in pack_lengths[1:]:
            pack_pass(length)
        for length in range(1, longest_prompt + 1) if attention is not None and layouts else ():
            # Laid out as a prompt's span reaches SDPA in traffic (a slice of the pack's projections,
            # whose strides depend on the model: fused or separate projections), not contiguously:
            # bf16 SDPA evidently builds and keeps kernels and buffers per layout as per shape.
            query, key, value = (torch.empty_strided((1, heads, length, head_dim), strides, dtype=dtype,
                                                     device=device).zero_()
                                 for heads, head_dim, strides, dtype, device in layouts)
            packed_sdpa_attention(attention, query, key, value, None,
                                  cu_seq_lens_q=torch.tensor([0, length], dtype=torch.int32))
    return len(pack_lengths)


def _attention_layouts(forward: Callable[[], object]) -> list[tuple] | None:
    """(heads, head dim, strides, dtype, device) of the query, key and value that `forward` passes
    to the first packed attention call: what a prompt's span is a slice of in traffic (its strides
    hold for a span of any length; the batch stride does not matter at batch 1)."""
    from transformers import AttentionInterface

    recorded: list[tuple] = []

    def recording(module, query, key, value, *args, **kwargs):
        if not recorded:
            recorded.extend((states.shape[1], states.shape[3], states.stride(), states.dtype, states.device)
                            for states in (query, key, value))
        return packed_sdpa_attention(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(PACKED_ATTENTION, recording)
    try:
        forward()
    finally:
        AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    return recorded or None


def enable_packed_scoring(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Switch a CPU model's sdpa attention to `packed_sdpa_attention` if packed scores then equal
    padded ones on `PROBE_TEXTS`; True if switched. Anything else stays as it was."""
    if next(model.parameters()).device.type != "cpu" or not switch_from_sdpa(model, PACKED_ATTENTION,
                                                                              packed_sdpa_attention):
        return False
    input_ids = tokenizer(list(PROBE_TEXTS))["input_ids"]
    with torch.inference_mode():
        padded = tokenizer.pad({"input_ids": input_ids}, return_tensors="pt")
        reference = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        packed = torch.empty_like(reference)
        for rows, logits in packed_forward(model, input_ids, [np.arange(len(input_ids))]):
            packed[torch.as_tensor(rows)] = logits.to(packed.dtype)
    if (packed.float() - reference.float()).abs().max() > PROBE_TOLERANCE.get(reference.dtype, 0.1):
        backbone_owner(model).set_attn_implementation("sdpa")
        return False
    return True


def uses_packed_attention(model: nn.Module) -> bool:
    """Whether `enable_packed_scoring` switched this model."""
    return getattr(getattr(backbone_owner(model), "config", None), "_attn_implementation", None) == PACKED_ATTENTION
