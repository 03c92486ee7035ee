"""Frozen-prefix caching for the top-N strategy, on tiny random backbones (fp32, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from safety_classifier.formatting import encode_prompts
from safety_classifier.modeling import build_model, find_transformer_blocks, load_tokenizer
from safety_classifier.prefix_cache import (
    CachedPrefixCollator,
    PrefixCacheTooLarge,
    TopLayersOnCachedPrefix,
    estimate_cache_bytes,
    prefix_hidden_states_from_ids,
)
from safety_classifier.prefix_store import build_cached_dataset

# Lengths differ a lot on purpose; the last prompt ends with the pad token itself, which the
# model's own pooling skips (it reads the rightmost token that is not the pad id).
BASE_PROMPTS = [
    "hi",
    "What is the capital of France?",
    "How do I build a bomb to attack the bank? Tell me now, step by step, without being caught.",
    "Write a short poem about bees.",
    "x y z",
    "Translate hello into Spanish please, quickly and well.",
    "Recommend a good book about trains {pad}",
]
LABELS = [0, 0, 1, 0, 0, 0, 1]
BATCHES = [[0, 1, 2], [3, 4, 5, 6], [2, 6, 0], [5, 1, 3, 4], [6, 2]]


def prompts_for(tokenizer) -> list[str]:
    return [prompt.format(pad=tokenizer.pad_token) for prompt in BASE_PROMPTS]


def prefix_states(model, tokenizer, texts, num_layers: int, max_length: int, **options) -> list[torch.Tensor]:
    """The cached states of `texts`, tokenized as `build_cached_dataset` tokenizes them."""
    input_ids = encode_prompts(tokenizer, texts, max_length)
    return prefix_hidden_states_from_ids(model, input_ids, num_layers, pad_token_id=tokenizer.pad_token_id, **options)


def fresh_model(path: str, tokenizer, num_layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)  # the head is initialised at random: same seed, same head
    return build_model("full_layers", path, tokenizer, torch.float32, num_layers=num_layers)


def full_model_logits(model, tokenizer, prompts):
    batch = tokenizer(prompts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("architecture", ["llama", "phi3", "qwen2", "gemma"])
def test_cached_top_layers_give_the_full_models_logits(tiny_model_factory, architecture):
    path = str(tiny_model_factory(architecture))
    tokenizer = load_tokenizer(path)
    PROMPTS = prompts_for(tokenizer)  # noqa: N806
    model = fresh_model(path, tokenizer).eval()
    assert tokenizer(PROMPTS[-1])["input_ids"][-1] == tokenizer.pad_token_id
    with torch.no_grad():
        expected = full_model_logits(model, tokenizer, PROMPTS)
        # A small token budget: the prefix runs in several batches of other padded lengths.
        dataset = build_cached_dataset(model, tokenizer, encode_prompts(tokenizer, PROMPTS, 64), LABELS, num_layers=1,
                                       max_batch_tokens=40)
        wrapper = TopLayersOnCachedPrefix(model, num_layers=1).eval()
        batch = CachedPrefixCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(PROMPTS))])
        got = wrapper(**batch).logits
        # Without input ids the wrapper pools the last real token: the same for rows not ending in the pad id.
        by_mask = wrapper(hidden_states=batch["hidden_states"], attention_mask=batch["attention_mask"]).logits
    assert batch["attention_mask"].sum(1).tolist() == [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert got.shape == (len(PROMPTS), 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_mask[:-1], expected[:-1], atol=1e-5, rtol=0)
    assert (expected[:, 1] - expected[:, 0]).std() > 1e-4, "distinct prompts should get distinct logits"
    # The backbone is whole again after both halves ran.
    assert len(find_transformer_blocks(model)) == 2
    assert type(model.base_model.norm).__name__ != "Identity"


def test_prefix_states_are_unpadded_in_input_order_and_in_the_model_dtype(tiny_model_factory):
    path = str(tiny_model_factory("llama"))
    tokenizer = load_tokenizer(path)
    PROMPTS = prompts_for(tokenizer)  # noqa: N806
    model = fresh_model(path, tokenizer)
    states = prefix_states(model, tokenizer, PROMPTS, num_layers=1, max_length=64, max_batch_tokens=30)
    alone = [prefix_states(model, tokenizer, [p], num_layers=1, max_length=64)[0] for p in PROMPTS]
    for prompt, state, single in zip(PROMPTS, states, alone):
        assert state.shape == (len(tokenizer(prompt)["input_ids"]), 64)
        assert state.dtype == torch.float32 and not state.requires_grad and not state.is_inference()
        torch.testing.assert_close(state, single, atol=1e-5, rtol=0)
    # num_layers = number of blocks: the cache is the embedding output itself.
    embeddings = prefix_states(model, tokenizer, PROMPTS[:2], num_layers=2, max_length=64)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    torch.testing.assert_close(embeddings[1], model.get_input_embeddings()(torch.tensor(ids)).detach())


def test_a_cache_over_the_memory_limit_is_refused(tiny_model_factory):
    path = str(tiny_model_factory("llama"))
    tokenizer = load_tokenizer(path)
    PROMPTS = prompts_for(tokenizer)  # noqa: N806
    model = fresh_model(path, tokenizer)
    tokens = sum(len(ids) for ids in tokenizer(PROMPTS)["input_ids"])
    assert estimate_cache_bytes([3, 5], 64, torch.bfloat16) == 8 * 64 * 2
    with pytest.raises(PrefixCacheTooLarge, match="over the limit"):
        prefix_states(model, tokenizer, PROMPTS, 1, 64, max_cache_bytes=tokens * 64 * 4 - 1)
    assert len(prefix_states(model, tokenizer, PROMPTS, 1, 64, max_cache_bytes=tokens * 64 * 4)) == 7
    # Stored in the model's dtype: a bf16 backbone gives a bf16 cache, half the bytes.
    bf16 = build_model("full_layers", path, tokenizer, torch.bfloat16, num_layers=1)
    states = prefix_states(bf16, tokenizer, PROMPTS, 1, 64, max_cache_bytes=tokens * 64 * 2)
    assert {state.dtype for state in states} == {torch.bfloat16}


def train_side_by_side(reference, wrapper, tokenizer, prompts, dataset, *, lr: float, atol: float) -> None:
    """AdamW steps over BATCHES on the full model and on the cached wrapper, their losses equal at each step."""
    collate = CachedPrefixCollator(tokenizer.pad_token_id)
    ids = tokenizer(prompts, truncation=True, max_length=64)["input_ids"]
    labels = torch.tensor(LABELS)
    optimisers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (reference, wrapper)]
    for batch in BATCHES:
        padded = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
        reference_loss = F.cross_entropy(reference(**padded).logits, labels[batch])
        cached_loss = F.cross_entropy(wrapper(**collate([dataset[i] for i in batch])).logits, labels[batch])
        torch.testing.assert_close(cached_loss, reference_loss, atol=atol, rtol=0)
        for model_loss, optimiser in zip((reference_loss, cached_loss), optimisers):
            optimiser.zero_grad()
            model_loss.backward()
            optimiser.step()


@pytest.mark.parametrize("architecture", ["llama", "phi3"])
def test_training_on_the_cache_matches_training_the_full_model(tiny_model_factory, architecture):
    path = str(tiny_model_factory(architecture))
    tokenizer = load_tokenizer(path)
    PROMPTS = prompts_for(tokenizer)  # noqa: N806
    reference = fresh_model(path, tokenizer).train()
    cached = fresh_model(path, tokenizer).train()
    initial = {name: p.detach().clone() for name, p in cached.named_parameters()}
    for name, parameter in reference.named_parameters():
        assert torch.equal(parameter, initial[name])

    wrapper = TopLayersOnCachedPrefix(cached, num_layers=1).train()
    trainable = {id(p) for p in cached.parameters() if p.requires_grad}
    assert {id(p) for p in wrapper.parameters()} == trainable, "the wrapper trains exactly the model's own top"
    dataset = build_cached_dataset(cached, tokenizer, encode_prompts(tokenizer, PROMPTS, 64), LABELS, num_layers=1,
                                   max_batch_tokens=40)
    train_side_by_side(reference, wrapper, tokenizer, PROMPTS, dataset, lr=1e-3, atol=1e-5)

    trained = reference_params = dict(reference.named_parameters())
    changed = 0.0
    for name, parameter in cached.named_parameters():
        torch.testing.assert_close(parameter, trained[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
        if parameter.requires_grad:
            changed = max(changed, (parameter - initial[name]).abs().max().item())
            assert reference_params[name].grad is not None and parameter.grad is not None
        else:
            assert torch.equal(parameter, initial[name]), f"frozen {name} changed"
    assert changed > 1e-3, "training should have moved the trainable weights"
    assert any(name.startswith("model.layers.1.") for name, p in cached.named_parameters() if p.requires_grad)
    # The full model, trained through the wrapper, scores like the one trained directly.
    with torch.no_grad():
        torch.testing.assert_close(full_model_logits(cached.eval(), tokenizer, PROMPTS),
                                   full_model_logits(reference.eval(), tokenizer, PROMPTS), atol=1e-5, rtol=0)


def test_the_wrapper_trains_with_the_transformers_trainer(tiny_phi3, tmp_path):
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    path = str(tiny_phi3)
    tokenizer = load_tokenizer(path)
    PROMPTS = prompts_for(tokenizer)  # noqa: N806
    model = fresh_model(path, tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = build_cached_dataset(model, tokenizer, encode_prompts(tokenizer, PROMPTS * 2, 64), LABELS * 2, num_layers=1)
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), num_train_epochs=1, learning_rate=1e-3,
                             per_device_train_batch_size=4, train_sampling_strategy="group_by_length",
                             use_cpu=True, report_to="none", save_strategy="no", logging_steps=50,
                             label_names=["labels"], seed=0)
    Trainer(model=TopLayersOnCachedPrefix(model, 1), args=args, train_dataset=dataset,
            data_collator=CachedPrefixCollator(tokenizer.pad_token_id)).train()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and moved <= {name for name, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.score.weight, model.score.weight)


@pytest.mark.parametrize("num_layers", ["0", "1"])
def test_train_full_layers_with_the_cache_equals_training_without_it(tiny_phi3, toy_files, tmp_path, capsys, num_layers):
    """The whole recipe (Trainer, 2 epochs, best checkpoint, reload, scoring) with and without the cache."""
    from conftest import fast_training_flags
    from safetensors.torch import load_file

    from safety_classifier.cli import train_main

    runs = {}
    for name, flags in (("cached", []), ("uncached", ["--no-cache-prefix"])):
        runs[name] = tmp_path / name
        arguments = fast_training_flags(tiny_phi3, toy_files, runs[name], "--num-layers", num_layers,
                                        "--dtype", "fp32", "--epochs", "2", "--learning-rate", "1e-3", *flags)
        assert train_main("full_layers", arguments) == 0
        assert ("frozen prefix cached" in capsys.readouterr().out) == (name == "cached")
    cached, uncached = (load_file(runs[name] / "model.safetensors") for name in ("cached", "uncached"))
    assert cached.keys() == uncached.keys()
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    for split in ("validation", "test"):
        scores = [pd.read_csv(runs[name] / f"{split}_predictions.csv")["unsafe_probability"] for name in runs]
        np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)
        assert scores[0].std() > 1e-4, "training should give distinct scores"
    histories = [json.loads((runs[name] / "validation_history.json").read_text()) for name in runs]
    assert [h["epoch"] for h in histories[0]] == [h["epoch"] for h in histories[1]] == [1.0, 2.0]
    for first, second in zip(*histories):
        assert first["auprc"] == pytest.approx(second["auprc"], abs=1e-6)
