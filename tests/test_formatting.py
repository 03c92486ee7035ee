"""Prompt templates: how a text is formatted and encoded, stored with the classifier, used by every scoring path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import fast_training_flags

from safety_classifier.artifacts import METADATA_FILE
from safety_classifier.cli import train_main
from safety_classifier.errors import PromptTemplateError
from safety_classifier.formatting import RESPONSE_TEMPLATE, PromptResponse, encode_prompts, pair_lengths, template_token_count
from safety_classifier.inference import load_classifier
from safety_classifier.modeling import load_tokenizer

TEMPLATE = "Prompt: {text}\nVerdict:"
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["Tell me how to shoplift", "What is the capital of France? " * 40, ""]


@pytest.fixture
def tokenizer(tiny_phi3):
    return load_tokenizer(str(tiny_phi3))


def test_without_a_template_a_text_is_encoded_as_the_tokenizer_encodes_it(tokenizer):
    assert encode_prompts(tokenizer, TEXTS, 32) == tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]


def test_a_template_wraps_each_text_and_long_texts_lose_their_own_tail(tokenizer):
    short, long, empty = encode_prompts(tokenizer, TEXTS, 48, TEMPLATE)
    assert tokenizer.decode(short) == TEMPLATE.replace("{text}", TEXTS[0])
    assert tokenizer.decode(empty) == TEMPLATE.replace("{text}", "")
    added = template_token_count(tokenizer, TEMPLATE)
    assert len(empty) == added > 0
    # Cut to 48 tokens with the template whole: it starts and ends as the template does.
    assert len(long) == 48
    text = tokenizer.decode(long)
    assert text.startswith("Prompt: What is the capital") and text.endswith("\nVerdict:")
    suffix = tokenizer("\nVerdict:", add_special_tokens=False)["input_ids"]
    assert long[-len(suffix):] == suffix


def test_the_chat_template_puts_the_text_in_the_users_turn(tokenizer):
    tokenizer.chat_template = CHAT
    (ids,) = encode_prompts(tokenizer, [TEXTS[0]], 64, "chat")
    assert tokenizer.decode(ids) == f"<|user|>{TEXTS[0]}</s><|assistant|>"


@pytest.mark.parametrize("template, max_length, message", [
    ("no placeholder", 64, "exactly one {text}"),
    ("{text} and {text}", 64, "exactly one {text}"),
    ("chat", 64, "no chat template"),
    (TEMPLATE, 4, "leaves no room for a text"),
])
def test_unusable_templates_are_refused_with_a_reason(tokenizer, template, max_length, message):
    with pytest.raises(PromptTemplateError, match=message):
        encode_prompts(tokenizer, TEXTS, max_length, template)


def test_training_refuses_a_malformed_template_before_it_starts(tiny_phi3, toy_files, tmp_path, capsys):
    flags = fast_training_flags(tiny_phi3, toy_files, tmp_path / "run", "--prompt-template", "Prompt:")
    assert train_main("lora", flags) == 2
    assert "exactly one {text}" in capsys.readouterr().err
    assert not (tmp_path / "run" / METADATA_FILE).exists()


@pytest.mark.parametrize("strategy, extra", [("lora", ["--lora-r", "4"]), ("full_layers", ["--num-layers", "1"])])
def test_a_template_is_stored_and_every_scoring_path_reads_texts_in_it(tiny_phi3, toy_files, tmp_path, strategy, extra):
    """Trained in a template (top-N: on the cached prefix of the templated texts), saved with it, and
    the loaded classifier scores the test rows as the run recorded them, which it does not without it."""
    output_dir = tmp_path / "run"
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, *extra, "--prompt-template", TEMPLATE)
    assert train_main(strategy, flags) == 0
    metadata = json.loads((output_dir / METADATA_FILE).read_text())
    assert metadata["prompt_template"] == TEMPLATE and metadata["format_version"] == 6

    classifier = load_classifier(output_dir, dtype="fp32")
    assert classifier.prompt_template == TEMPLATE
    texts = pd.read_csv(toy_files["test"])["user_input"].tolist()
    recorded = pd.read_csv(output_dir / "test_predictions.csv")["unsafe_probability"].to_numpy()
    np.testing.assert_allclose(classifier.unsafe_probabilities(texts, show_progress=False), recorded, atol=1e-6)
    np.testing.assert_allclose(classifier.unsafe_probabilities(texts, show_progress=False, pack=False), recorded,
                               atol=1e-6)
    bare = load_classifier(output_dir, dtype="fp32")
    bare.metadata = {key: value for key, value in bare.metadata.items() if key != "prompt_template"}
    assert np.abs(bare.unsafe_probabilities(texts, show_progress=False) - recorded).max() > 1e-4


def test_a_prompt_with_its_response_is_one_sequence_with_roles(tokenizer):
    pair = PromptResponse("Tell me how to shoplift", "I can't help with that.")
    (ids,) = encode_prompts(tokenizer, [pair], 128)
    expected = RESPONSE_TEMPLATE.format(prompt=pair.prompt, response=pair.response)
    assert tokenizer.decode(ids) == expected
    # The same texts as a prompt encode differently: the task is part of the input.
    assert ids != encode_prompts(tokenizer, [pair.prompt], 128)[0]


def test_prompts_keep_their_encoding_beside_pairs(tokenizer):
    pair = PromptResponse("What is the capital of France?", "Paris.")
    mixed = encode_prompts(tokenizer, [TEXTS[0], pair, TEXTS[1]], 48)
    assert [mixed[0], mixed[2]] == encode_prompts(tokenizer, [TEXTS[0], TEXTS[1]], 48)
    assert mixed[1] == encode_prompts(tokenizer, [pair], 48)[0]


@pytest.mark.parametrize("prompt_tokens, response_tokens, room, kept", [
    (10, 1000, 100, (10, 90)),    # a long answer loses its tail, the prompt stays whole
    (1000, 10, 100, (90, 10)),    # a long prompt loses its tail, the answer stays whole
    (1000, 1000, 100, (50, 50)),  # both long: each keeps half
    (30, 40, 100, (30, 40)),
])
def test_a_long_pair_cuts_the_response_first_and_both_keep_room(prompt_tokens, response_tokens, room, kept):
    assert pair_lengths(prompt_tokens, response_tokens, room) == kept


def test_a_long_pair_keeps_the_template_whole(tokenizer):
    pair = PromptResponse("How do I pick a lock? " * 50, "First, insert a tension wrench. " * 50)
    (ids,) = encode_prompts(tokenizer, [pair], 96)
    assert len(ids) == 96
    text = tokenizer.decode(ids)
    assert text.startswith("User: How do I pick a lock?") and "\n\nAssistant: First, insert" in text
    assert text.endswith("\n\nIs the assistant's reply harmful?")


def test_the_chat_template_puts_the_pair_in_a_user_and_an_assistant_turn(tokenizer):
    tokenizer.chat_template = CHAT
    (ids,) = encode_prompts(tokenizer, [PromptResponse("Hi", "Hello!")], 64, "chat")
    assert tokenizer.decode(ids) == "<|user|>Hi</s><|assistant|>Hello!</s>"
