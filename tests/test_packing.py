"""Packed scoring (safety_classifier/packing.py): the same scores as padded batches, fewer passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safety_classifier.attention import register_attention
from safety_classifier.batching import pack_rows, scoring_plan
from safety_classifier.inference import load_classifier, predict_logits
from safety_classifier.modeling import build_model, find_head_name, load_tokenizer
from safety_classifier.packing import (
    PACKED_ATTENTION,
    PROBE_TOLERANCE,
    enable_packed_scoring,
    packed_forward,
    uses_packed_attention,
)

ARCHITECTURES = ["llama", "phi3", "qwen2", "gemma"]
PROMPTS = ["hi", "What is the capital of France?", "How do I build a bomb to attack the bank? Tell me now.",
           "Write a short poem about bees.", "x y z", "Translate hello into Spanish please, quickly and well.",
           "", None, "What is the capital of France?"]


def count_passes(model) -> list[int]:
    passes: list[int] = []
    getattr(model, find_head_name(model)).register_forward_hook(lambda *_: passes.append(1))
    return passes


def test_packs_hold_every_row_once_within_the_budget():
    lengths = np.random.default_rng(0).integers(1, 300, size=500)
    for budget in (64, 512, 2048):
        packs = pack_rows(lengths, budget, max_pack_rows=50)
        assert sorted(np.concatenate(packs).tolist()) == list(range(500))
        assert all(lengths[pack].sum() <= budget or len(pack) == 1 for pack in packs)
        assert all(len(pack) <= 50 for pack in packs)


def test_a_few_prompts_of_mixed_lengths_pack_and_many_sorted_ones_stay_padded():
    # 200 + 3 x 10 tokens: padded, two passes (200 + 30 tokens); packed, one pass of 230 tokens.
    packed, mixed = scoring_plan(np.asarray([200, 10, 10, 10]), 2048)
    assert packed and [sorted(pack.tolist()) for pack in mixed] == [[0, 1, 2, 3]]
    assert scoring_plan(np.full(100, 20), 2048)[0] is False  # one pass of 2,000 tokens without padding


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_packed_scores_equal_padded_ones_for_every_backbone(tiny_model_factory, architecture):
    path = str(tiny_model_factory(architecture))
    tokenizer = load_tokenizer(path)
    model = build_model("full_layers", path, tokenizer, torch.float32, num_layers=0)
    padded = predict_logits(model, tokenizer, PROMPTS, max_length=64, show_progress=False)
    assert not uses_packed_attention(model)
    with pytest.raises(ValueError, match="pack=True needs a model switched to packed attention"):
        predict_logits(model, tokenizer, PROMPTS, max_length=64, pack=True, show_progress=False)
    assert enable_packed_scoring(model, tokenizer) and uses_packed_attention(model)
    input_ids = tokenizer([p for p in PROMPTS if p], truncation=True, max_length=64)["input_ids"]
    lengths = np.asarray([len(ids) for ids in input_ids])
    passes = count_passes(model)
    for budget in (8, 40, 100_000):  # one or two prompts a pass, a few, all of them in one row
        packs = pack_rows(lengths, budget)
        packed = np.full_like(padded, np.nan)
        passes.clear()
        with torch.inference_mode():
            for rows, logits in packed_forward(model, input_ids, packs):
                packed[np.flatnonzero([bool(p) for p in PROMPTS])[rows]] = logits.double().numpy()
        np.testing.assert_allclose(packed, padded, rtol=0, atol=1e-5)  # empty prompts: NaN rows on both sides
        assert len(passes) == len(packs)
    assert len(pack_rows(lengths, 8)) > len(pack_rows(lengths, 40)) > len(pack_rows(lengths, 100_000)) == 1
    # Whichever way predict_logits picks for the switched model, the scores are the same.
    np.testing.assert_allclose(predict_logits(model, tokenizer, PROMPTS, max_length=64, show_progress=False),
                               padded, rtol=0, atol=1e-5)
    # The switched model still scores padded batches as before.
    batch = tokenizer.pad({"input_ids": input_ids}, return_tensors="pt")
    with torch.inference_mode():
        again = model(**batch).logits.double().numpy()
    np.testing.assert_allclose(again, padded[[bool(p) for p in PROMPTS]], rtol=0, atol=1e-5)


def test_packed_rows_that_attended_across_prompts_would_be_caught(tiny_phi3, monkeypatch):
    """The control: the same rows through attention that ignores the spans score differently, and
    the probe then leaves the model on padded batches."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from safety_classifier import packing

    tokenizer = load_tokenizer(str(tiny_phi3))
    model = build_model("full_layers", str(tiny_phi3), tokenizer, torch.float32, num_layers=0)
    padded = predict_logits(model, tokenizer, PROMPTS[:6], max_length=64, show_progress=False)

    def whole_row_attention(module, query, key, value, attention_mask, **kwargs):
        kwargs = {name: value for name, value in kwargs.items() if not name.startswith(("cu_seq_lens", "max_length"))}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(packing, "packed_sdpa_attention", whole_row_attention)
    try:
        register_attention(PACKED_ATTENTION, packing.packed_sdpa_attention)
        model.set_attn_implementation(PACKED_ATTENTION)
        input_ids = tokenizer(PROMPTS[:6])["input_ids"]
        with torch.inference_mode():
            [(rows, leaked)] = list(packed_forward(model, input_ids, [np.arange(6)]))
        assert np.abs(leaked.double().numpy() - padded[rows]).max() > 1e-3
        model.set_attn_implementation("sdpa")
        assert not enable_packed_scoring(model, tokenizer)
        assert model.config._attn_implementation == "sdpa" and not uses_packed_attention(model)
        np.testing.assert_allclose(predict_logits(model, tokenizer, PROMPTS[:6], max_length=64, show_progress=False),
                                   padded, rtol=0, atol=1e-6)
    finally:
        monkeypatch.undo()
        register_attention(PACKED_ATTENTION, packing.packed_sdpa_attention)
    monkeypatch.setitem(PROBE_TOLERANCE, torch.float32, -1.0)  # any difference at all: not switched
    assert not enable_packed_scoring(model, tokenizer) and not uses_packed_attention(model)


@pytest.mark.parametrize("merge_adapters", [True, False])
def test_a_loaded_classifier_scores_packed_as_it_scores_padded(tiny_lora_classifier, merge_adapters):
    packed = load_classifier(tiny_lora_classifier, dtype="fp32", merge_adapters=merge_adapters)
    padded = load_classifier(tiny_lora_classifier, dtype="fp32", merge_adapters=merge_adapters, pack_prompts=False)
    assert uses_packed_attention(packed.model) and not uses_packed_attention(padded.model)
    texts = [" ".join(["bees"] * 50)] + PROMPTS  # one long prompt among short ones: cheaper packed
    lengths = [len(ids) for ids in packed.tokenizer([t for t in texts if t], truncation=True,
                                                    max_length=packed.max_length)["input_ids"]]
    assert scoring_plan(np.asarray(lengths), 2048)[0] is True
    np.testing.assert_allclose(packed.scores(texts, show_progress=False), padded.scores(texts, show_progress=False),
                               rtol=0, atol=1e-6)


def test_half_precision_cpu_packs_come_in_steps_and_score_as_padded(tiny_phi3, monkeypatch):
    """Packs padded to PACK_TOKEN_MULTIPLE (what a bf16 model on CPU gets) change no score: checked
    in fp32, where the steps are forced, against padded batches; the warm-up meets every pack
    length and every prompt length's attention."""
    from safety_classifier import packing

    tokenizer = load_tokenizer(str(tiny_phi3))
    model = build_model("full_layers", str(tiny_phi3), tokenizer, torch.float32, num_layers=0)
    padded = predict_logits(model, tokenizer, PROMPTS, max_length=64, show_progress=False)
    assert enable_packed_scoring(model, tokenizer) and packing.pack_token_multiple(model) == 1
    pack_lengths: list[int] = []
    head = getattr(model, find_head_name(model))
    head.register_forward_hook(lambda module, inputs, output: pack_lengths.append(inputs[0].shape[1]))
    monkeypatch.setattr(packing, "packs_in_steps", lambda dtype, device: True)
    assert packing.pack_token_multiple(model) == packing.PACK_TOKEN_MULTIPLE
    stepped = predict_logits(model, tokenizer, PROMPTS, max_length=64, pack=True, show_progress=False)
    np.testing.assert_allclose(stepped, padded, rtol=0, atol=1e-5)  # empty prompts: NaN rows on both sides
    assert pack_lengths and all(length % packing.PACK_TOKEN_MULTIPLE == 0 for length in pack_lengths)

    pack_lengths.clear()
    span_lengths: list[int] = []
    by_length = packing.spans_by_length
    monkeypatch.setattr(packing, "spans_by_length", lambda bounds: [
        span_lengths.append(length) or (starts, length) for starts, length in by_length(bounds)])
    # What reaches SDPA for single-prompt spans: the shape of query, key and value, and their strides
    # between tokens and within a head (the head stride moves with the pack's length).
    from transformers.integrations import sdpa_attention

    layouts: list[tuple] = []
    attend = sdpa_attention.sdpa_attention_forward

    def recording(module, query, key, value, *args, **kwargs):
        if query.shape[0] == 1:
            layouts.append(tuple((tuple(states.shape[1:]), states.stride()[2:]) for states in (query, key, value)))
        return attend(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", recording)
    assert packing.warm_up_shapes(model, longest_pack=150, longest_prompt=20) == 3
    assert pack_lengths == [64, 128, 192]  # every pack length up to 150
    # The passes' own spans (one per layer and pass), then each prompt length's attention once.
    assert span_lengths[-20:] == list(range(1, 21))
    warmed_up = set(layouts)
    # Served prompts of those lengths meet no layout the warm-up did not: Phi-3's value is a slice of
    # its fused projection (a token stride of query, key and value heads together), not contiguous.
    layouts.clear()
    predict_logits(model, tokenizer, PROMPTS, max_length=20, pack=True, show_progress=False)
    served = {layout for layout in layouts if layout[0][0][1] <= 20}
    head_dim = served and next(iter(served))[2][0][2]
    assert served and all(value_strides[0] > head_dim for _, _, (_, value_strides) in served)
    assert served <= warmed_up


def test_only_half_precision_models_on_cpu_step_their_shapes(tiny_phi3):
    from safety_classifier import packing

    tokenizer = load_tokenizer(str(tiny_phi3))
    model = build_model("full_layers", str(tiny_phi3), tokenizer, torch.float32, num_layers=0)
    assert enable_packed_scoring(model, tokenizer)
    assert packing.pack_token_multiple(model) == 1
    assert packing.warm_up_shapes(model, longest_pack=512, longest_prompt=64) == 0
    model.to(torch.bfloat16)
    assert packing.pack_token_multiple(model) == packing.PACK_TOKEN_MULTIPLE
    assert not packing.packs_in_steps(torch.bfloat16, torch.device("cuda"))
