"""The CPU training attention (eager for short sequences, SDPA for long ones) computes what SDPA computes."""

from __future__ import annotations

import pytest
import torch

from safety_classifier import attention
from safety_classifier.attention import TRAINING_ATTENTION, use_training_attention


def record_sdpa_calls(monkeypatch) -> list[int]:
    """The key lengths of every call to transformers' SDPA attention from now on (it still runs)."""
    from transformers.integrations import sdpa_attention

    key_lengths = []
    real_sdpa = sdpa_attention.sdpa_attention_forward

    def recording_sdpa(*args, **kwargs):
        key_lengths.append(args[2].shape[-2])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", recording_sdpa)
    return key_lengths


def forward_and_gradients(model, input_ids, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    logits.float().pow(2).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("architecture", ["phi3", "llama"])
@pytest.mark.parametrize("eager_max_keys", [384, 0], ids=["eager", "sdpa-above-the-limit"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "no-padding"])
def test_training_attention_matches_sdpa(tiny_model_factory, monkeypatch, architecture, eager_max_keys, padded):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(attention, "EAGER_MAX_KEYS", eager_max_keys)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_factory(architecture), num_labels=2,
                                                               dtype=torch.float32)
    model.config.pad_token_id = 0
    assert model.config._attn_implementation == "sdpa"
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 60, (3, 11), generator=generator)
    mask = torch.ones_like(input_ids)
    if padded:  # right padding, as the toolkit's tokenizer pads
        mask[1, 7:] = 0
        mask[2, 4:] = 0
        input_ids[mask == 0] = 0

    expected_logits, expected_grads = forward_and_gradients(model, input_ids, mask)
    assert use_training_attention(model)
    assert model.config._attn_implementation == TRAINING_ATTENTION
    logits, grads = forward_and_gradients(model, input_ids, mask)

    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    assert len(grads) == len(expected_grads)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_short_sequences_run_eager_and_long_ones_sdpa(tiny_phi3, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    calls = record_sdpa_calls(monkeypatch)
    monkeypatch.setattr(attention, "EAGER_MAX_KEYS", 8)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_phi3, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = 0
    assert use_training_attention(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (2, 8)))
        assert calls == []  # 8 keys: eager, in every layer
        model(input_ids=torch.randint(3, 60, (2, 9)))
    assert calls == [9] * model.config.num_hidden_layers


@pytest.mark.parametrize("strategy", ["lora", "full_layers"])
def test_training_runs_the_training_attention_on_a_cpu(tiny_phi3, toy_files, tmp_path, monkeypatch, strategy):
    """The model a session trains (for top-N: its top layers on the cached prefix) calls no SDPA."""
    from conftest import fast_training_flags

    from safety_classifier.cli import parse_training_plan
    from safety_classifier.training import build_training_session, load_training_splits

    extra = ["--num-layers", "1"] if strategy == "full_layers" else ["--lora-r", "4"]
    plan = parse_training_plan(strategy, fast_training_flags(tiny_phi3, toy_files, tmp_path, *extra))
    session = build_training_session(plan, load_training_splits(plan))
    assert session.cached_prefix == (strategy == "full_layers")
    owner = session.model.get_base_model() if strategy == "lora" else session.model
    assert owner.config._attn_implementation == TRAINING_ATTENTION

    calls = record_sdpa_calls(monkeypatch)
    batch = next(iter(session.trainer.get_train_dataloader()))
    session.trainer.model(**{key: value for key, value in batch.items() if key != "labels"})
    assert calls == []
