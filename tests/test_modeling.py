"""Model building on tiny random backbones of the supported architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from safety_classifier.batching import (
    GPU_PASS_OVERHEAD_SHARE,
    PASS_OVERHEAD_SHARE,
    pass_overhead_tokens,
    scoring_batches,
    scoring_plan,
    token_budget_batches,
)
from safety_classifier.inference import predict_unsafe_probabilities
from safety_classifier.labels import MISSING_TARGET
from safety_classifier.modeling import (
    LoraSettings,
    build_model,
    count_parameters,
    find_transformer_blocks,
    load_tokenizer,
)
from safety_classifier.trainer import class_weights_for, weighted_cross_entropy

ARCHITECTURES = ["llama", "phi3", "qwen2", "gemma"]
PROMPTS = ["hi", "What is the capital of France?", "How do I build a bomb to attack the bank? Tell me now.",
           "Write a short poem about bees.", "x y z", "Translate hello into Spanish please, quickly and well."]


def trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_full_layers_trains_exactly_the_top_blocks_the_norm_and_the_head(tiny_model_factory, architecture, num_layers):
    path = str(tiny_model_factory(architecture))
    model = build_model("full_layers", path, load_tokenizer(path), torch.float32, num_layers=num_layers)
    names = trainable_names(model)
    expected_blocks = {f"model.layers.{i}." for i in range(2 - num_layers, 2)}
    assert {n for n in names if n.startswith("score.")} == {"score.weight"}
    assert {n[: len("model.layers.0.")] for n in names if n.startswith("model.layers.")} == expected_blocks
    assert ("model.norm.weight" in names) == (num_layers > 0)
    assert not any(n.startswith("model.embed_tokens") for n in names)
    every_block_param = {n for n, _ in model.named_parameters() if n[: len("model.layers.0.")] in expected_blocks}
    assert every_block_param <= names


def test_full_layers_rejects_more_layers_than_the_model_has(tiny_phi3):
    with pytest.raises(ValueError, match="between 0 and 2"):
        build_model("full_layers", str(tiny_phi3), load_tokenizer(str(tiny_phi3)), torch.float32, num_layers=3)


def test_lora_on_phi3_adapts_the_fused_projections(tiny_phi3):
    path = str(tiny_phi3)
    model = build_model("lora", path, load_tokenizer(path), torch.float32, lora=LoraSettings())
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    trained = trainable_names(model)
    assert any("score.modules_to_save" in name for name in trained), "the head must be trained and saved"
    assert all(".lora_" in name or "score" in name for name in trained)


def test_lora_target_override(tiny_phi3):
    path = str(tiny_phi3)
    model = build_model("lora", path, load_tokenizer(path), torch.float32, lora=LoraSettings(target_modules=["qkv_proj"]))
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n} == {"qkv_proj"}


def test_qlora_quantises_the_blocks_to_nf4_and_keeps_the_head_full_precision(tiny_phi3):
    path = str(tiny_phi3)
    model = build_model("qlora", path, load_tokenizer(path), torch.bfloat16, lora=LoraSettings(), gradient_checkpointing=True)
    base = model.base_model.model
    qkv = base.model.layers[0].self_attn.qkv_proj.base_layer
    assert type(qkv).__name__ == "Linear4bit"
    assert qkv.weight.quant_state.quant_type == "nf4"
    assert qkv.weight.quant_state.nested, "double quantisation"
    assert qkv.compute_dtype == torch.bfloat16
    assert base.score.modules_to_save["default"].weight.dtype == torch.float32
    assert base.is_gradient_checkpointing
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    # 4-bit weights count as the values they hold: the unquantised backbone plus what LoRA adds.
    unquantised = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    assert total == sum(p.numel() for p in unquantised.parameters()) + trainable


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("with_unk", [True, False])
def test_padding_never_changes_a_score(tiny_model_factory, architecture, with_unk):
    """A prompt scores the same alone and in a padded batch, for every backbone and pad choice."""
    path = str(tiny_model_factory(architecture, with_unk=with_unk))
    tokenizer = load_tokenizer(path)
    expected_pad = "<|endoftext|>" if architecture == "qwen2" else "<unk>" if with_unk else "</s>"
    assert tokenizer.pad_token == expected_pad
    assert tokenizer.padding_side == "right"
    model = build_model("full_layers", path, tokenizer, torch.float32, num_layers=0)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batched = predict_unsafe_probabilities(model, tokenizer, PROMPTS, max_length=64, max_batch_tokens=10_000, show_progress=False)
    alone = [predict_unsafe_probabilities(model, tokenizer, [p], max_length=64, show_progress=False)[0] for p in PROMPTS]
    np.testing.assert_allclose(batched, alone, atol=1e-6)


def test_a_pad_token_outside_the_vocabulary_is_refused(tiny_phi3, tmp_path):
    from safety_classifier.errors import ModelLoadError
    from safety_classifier.modeling import load_sequence_classifier

    tokenizer = load_tokenizer(str(tiny_phi3))
    tokenizer.add_special_tokens({"pad_token": "<brand-new-pad>"})
    with pytest.raises(ModelLoadError, match=r"pad token '<brand-new-pad>' \(id 40\d\) is outside"):
        load_sequence_classifier(str(tiny_phi3), tokenizer, torch.float32)


def test_a_saved_binary_classifier_gets_a_new_head_for_categories(tiny_phi3, tmp_path):
    """Category training from a saved safe/unsafe classifier: its 2-output head gives way to a fresh one of
    2 + categories outputs, with a warning; the backbone's weights are the saved ones."""
    from safety_classifier.labels import Category, LabelSchema
    from safety_classifier.modeling import find_head_name, load_sequence_classifier

    tokenizer = load_tokenizer(str(tiny_phi3))
    binary = load_sequence_classifier(str(tiny_phi3), tokenizer, torch.float32)
    binary.save_pretrained(tmp_path / "binary")
    schema = LabelSchema((Category("S1", "Violent Crimes"), Category("S9", "Hate")))
    with pytest.warns(UserWarning, match=r"head of another size \(score.weight \(2, 64\).*new head of 4 outputs"):
        model = load_sequence_classifier(str(tmp_path / "binary"), tokenizer, torch.float32, schema=schema)
    assert getattr(model, find_head_name(model)).weight.shape == (4, 64)
    assert model.config.id2label == {0: "safe", 1: "unsafe", 2: "S1", 3: "S9"}
    torch.testing.assert_close(model.get_input_embeddings().weight, binary.get_input_embeddings().weight)


@pytest.mark.parametrize("cuda_present", [True, False])
def test_loading_a_classifier_keeps_attention_off_cudnn_only_on_cuda(tiny_phi3, monkeypatch, cuda_present):
    """cuDNN attention keeps a plan per input shape in host memory for good (a GPU server's RSS grew by
    ~1.4 MiB a new batch shape); on a CPU the setting is left as it was."""
    from safety_classifier.modeling import load_sequence_classifier

    was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)
    try:
        load_sequence_classifier(str(tiny_phi3), load_tokenizer(str(tiny_phi3)), torch.float32)
        assert torch.backends.cuda.cudnn_sdp_enabled() is not cuda_present
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was_enabled)


def test_scores_come_back_in_input_order_whatever_the_batching(tiny_phi3):
    path = str(tiny_phi3)
    tokenizer = load_tokenizer(path)
    model = build_model("full_layers", path, tokenizer, torch.float32, num_layers=0)
    prompts = PROMPTS * 3 + ["", "   ", None]
    one_batch = predict_unsafe_probabilities(model, tokenizer, prompts, max_length=64, max_batch_tokens=100_000,
                                             show_progress=False)
    tiny_batches = predict_unsafe_probabilities(model, tokenizer, prompts, max_length=64, max_batch_tokens=16,
                                                show_progress=False)
    reversed_scores = predict_unsafe_probabilities(model, tokenizer, prompts[::-1], max_length=64, show_progress=False)
    np.testing.assert_allclose(one_batch, tiny_batches, atol=1e-6)
    np.testing.assert_allclose(one_batch, reversed_scores[::-1], atol=1e-6)
    assert len(set(np.round(one_batch[:6], 6))) > 1, "distinct prompts should get distinct scores"
    assert list(one_batch[-3:]) == [0.0, 0.0, 0.0], "empty prompts score 0.0 (safe) by definition"


def test_token_budget_batches_cover_every_row_once_within_budget():
    lengths = np.array([5, 300, 17, 17, 1, 64, 64, 2, 900, 33])
    batches = token_budget_batches(lengths, max_batch_tokens=128)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or lengths[batch].max() * len(batch) <= 128
    # Longest first, and each batch holds neighbours in length order.
    maxima = [lengths[b].max() for b in batches]
    assert maxima == sorted(maxima, reverse=True)



def padded_cost(lengths: np.ndarray, batches: list[np.ndarray], overhead: float) -> float:
    return sum(overhead + len(batch) * lengths[batch].max() for batch in batches)


def test_scoring_batches_are_the_cheapest_split_within_budget():
    rng = np.random.default_rng(0)
    for lengths in (np.array([400, 30, 30, 30]), np.array([5, 300, 17, 17, 1, 64, 64, 2, 900, 33]),
                    rng.integers(1, 512, 300), np.array([7])):
        batches = scoring_batches(lengths, max_batch_tokens=2048, overhead_tokens=64)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        for batch in batches:
            assert len(batch) == 1 or lengths[batch].max() * len(batch) <= 2048
        greedy = token_budget_batches(lengths, max_batch_tokens=2048)
        assert padded_cost(lengths, batches, 64) <= padded_cost(lengths, greedy, 64)
    # A long prompt gathered with short ones gets a pass of its own instead of padding them to 400.
    lengths = np.array([30, 400, 30, 30])
    assert [sorted(b.tolist()) for b in scoring_batches(lengths, 2048, overhead_tokens=64)] == [[1], [0, 2, 3]]
    # No grouping of these five rows at all (not only of neighbours in length order) is cheaper.
    lengths = np.array([30, 400, 29, 120, 31])

    def groupings(rows: list[int]):
        if not rows:
            yield []
            return
        first, rest = rows[0], rows[1:]
        for grouping in groupings(rest):
            yield [[first], *grouping]
            for i in range(len(grouping)):
                yield [*grouping[:i], [first, *grouping[i]], *grouping[i + 1:]]

    cheapest = min(padded_cost(lengths, [np.array(g) for g in grouping], 64)
                   for grouping in groupings(list(range(5)))
                   if all(len(g) * lengths[g].max() <= 512 or len(g) == 1 for g in grouping))
    chosen = scoring_batches(lengths, 512, overhead_tokens=64)
    assert padded_cost(lengths, chosen, 64) == cheapest


def test_on_a_gpu_a_served_batch_takes_fewer_passes():
    """A GPU pass costs mostly its fixed cost, so the plan pads more to run fewer passes; a CPU's stays."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pass_overhead_tokens(cpu, 2048) == 2048 * PASS_OVERHEAD_SHARE
    assert pass_overhead_tokens(cuda, 16384) == 16384 * GPU_PASS_OVERHEAD_SHARE
    # 30 prompts as a server gathers them: a few long ones among many short ones.
    lengths = np.array([512, 300, 120, 40, 30, *range(25, 0, -1)])
    _, cpu_plan = scoring_plan(lengths, 16384, pack=False, overhead_tokens=pass_overhead_tokens(cpu, 16384))
    _, gpu_plan = scoring_plan(lengths, 16384, pack=False, overhead_tokens=pass_overhead_tokens(cuda, 16384))
    assert len(gpu_plan) < len(cpu_plan)
    assert sorted(np.concatenate(gpu_plan).tolist()) == list(range(len(lengths)))
    default_plan = scoring_plan(lengths, 16384, pack=False)[1]  # as before: the CPU's share
    assert [batch.tolist() for batch in default_plan] == [batch.tolist() for batch in cpu_plan]


def test_class_weighted_loss_is_the_weighted_cross_entropy():
    labels = np.array([0] * 9 + [1])
    weights = class_weights_for(labels)
    np.testing.assert_allclose(weights.numpy(), [10 / 18, 10 / 2])
    root = class_weights_for(labels, "sqrt").numpy()
    assert root[1] / root[0] == pytest.approx(3.0) and (9 * root[0] + root[1]) / 10 == pytest.approx(1.0)
    np.testing.assert_array_equal(class_weights_for(labels, "none").numpy(), [1.0, 1.0])
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-0.3, 1.0]])
    batch_labels = torch.tensor([0, 1, 1])
    per_row = -torch.log_softmax(logits, -1)[torch.arange(3), batch_labels]
    row_weights = weights[batch_labels]
    loss = weighted_cross_entropy(weights)
    weighted_sum = (row_weights * per_row).sum().item()
    assert loss({"logits": logits}, batch_labels).item() == pytest.approx(weighted_sum / row_weights.sum().item())
    assert loss({"logits": logits}, batch_labels, num_items_in_batch=6).item() == pytest.approx(weighted_sum / 6)
    unweighted = weighted_cross_entropy(torch.ones(2))({"logits": logits}, batch_labels)
    assert unweighted.item() == pytest.approx(per_row.mean().item())


def test_a_training_rows_source_offset_is_added_to_its_unsafe_logit():
    logits = torch.tensor([[2.0, -1.0, 0.3], [0.5, 0.2, -0.4], [-0.3, 1.0, 0.1]])
    offsets = torch.tensor([1.5, -2.0, 0.0])
    shifted = logits.clone()
    shifted[:, 1] += offsets
    weights = torch.tensor([0.6, 3.0])
    binary = torch.tensor([0, 1, -1])
    loss = weighted_cross_entropy(weights, category_loss_weight=2.0)
    with_offset = torch.column_stack([binary.float(), offsets])
    assert loss({"logits": logits[:, :2]}, with_offset).item() == pytest.approx(
        loss({"logits": shifted[:, :2]}, binary).item())
    # With a category head: [binary, categories..., offset]; the category logits keep no offset.
    targets = torch.tensor([[1.0], [0.0], [MISSING_TARGET]])
    with_categories = torch.column_stack([binary.float(), targets])
    assert loss({"logits": logits}, torch.column_stack([with_categories, offsets])).item() == pytest.approx(
        loss({"logits": shifted}, with_categories).item())
    assert loss({"logits": logits}, with_categories).item() != pytest.approx(loss({"logits": shifted}, with_categories).item())


def test_blocks_are_found_for_every_architecture(tiny_model_factory):
    for architecture in ARCHITECTURES:
        path = str(tiny_model_factory(architecture))
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        assert len(find_transformer_blocks(model)) == 2


XEON = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 avx512f\n"


@pytest.mark.parametrize("cpuinfo, dtype, described", [
    (XEON, torch.bfloat16, "bfloat16 (Intel(R) Xeon(R) Platinum 8480+: native bf16 (AMX))"),
    (XEON.replace(" amx_bf16", ""), torch.bfloat16, "bfloat16 (Intel(R) Xeon(R) Platinum 8480+: native bf16 (AVX512-BF16))"),
    (EPYC, torch.float32, "float32 (AMD EPYC 7B13: no native bf16)"),
    ("", torch.float32, "no native bf16"),  # no /proc/cpuinfo (macOS): fp32, the CPU named by `platform`
])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it_and_says_why(monkeypatch, cpuinfo, dtype, described):
    from safety_classifier import modeling

    monkeypatch.setattr(modeling, "_read_cpuinfo", lambda: cpuinfo)
    assert modeling.resolve_dtype("auto", "cpu") == dtype
    assert modeling.cpu_supports_bf16() == (dtype == torch.bfloat16)
    assert described in modeling.describe_dtype("auto", "cpu")
    # An explicit choice wins over the hardware, and the line says it was asked for.
    assert modeling.describe_dtype("fp32", "cpu").startswith("float32 (--dtype fp32; ")
    assert modeling.describe_dtype("bf16", "cpu").startswith("bfloat16 (--dtype bf16; ")
    # The detection itself decides, whoever calls it.
    monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda: True)
    assert modeling.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert modeling.describe_dtype("auto", "cpu").startswith("bfloat16 (")


def test_on_cuda_the_dtype_line_names_the_gpu(monkeypatch):
    from safety_classifier import modeling

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert modeling.describe_dtype("auto", "cuda") == "bfloat16 (NVIDIA H200: native bf16)"
