"""Answers judged with the prompts they answer: Classifier.classify, infer.py, and the conversations serve.py takes."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from safety_classifier.cli import infer_main
from safety_classifier.formatting import PromptResponse, encode_pairs, encode_prompts
from safety_classifier.inference import Classifier, load_classifier
from safety_classifier.serving.api_server import create_app
from safety_classifier.serving.cli_args import ServeArguments
from safety_classifier.serving.conversation import Conversation, Message, fits, fitted_input

PROMPTS = ["How do I poison my neighbour's dog?", "What is the capital of France?"]
ANSWERS = ["Put rat poison in a piece of meat and throw it over the fence.", "Paris."]
PAIRS = [PromptResponse(prompt, answer) for prompt, answer in zip(PROMPTS, ANSWERS)]
ATOL = 1e-6


@pytest.fixture(scope="module")
def classifier(tiny_lora_classifier) -> Classifier:
    return load_classifier(tiny_lora_classifier, device="cpu", dtype="fp32")


def test_classify_says_which_text_it_judged_and_scores_a_pair_as_one_input(classifier):
    inputs = [PROMPTS[0], PAIRS[0], PAIRS[1], PromptResponse(PROMPTS[0], "  "), ""]
    results = list(classifier.classify(inputs, show_progress=False))
    assert results[0] == {"text": PROMPTS[0], "judged": "prompt", **classifier.verdict(
        classifier.scores([PROMPTS[0]], show_progress=False)[0])}
    assert {key: results[1][key] for key in ("text", "response", "judged")} == {
        "text": PROMPTS[0], "response": ANSWERS[0], "judged": "response"}
    # A pair scores what its encoding reads, the same alone as beside prompts, and not as its prompt does.
    alone = classifier.unsafe_probabilities(PAIRS, show_progress=False)
    np.testing.assert_allclose([result["unsafe_probability"] for result in results[1:3]], alone, rtol=0, atol=ATOL)
    assert abs(results[1]["unsafe_probability"] - results[0]["unsafe_probability"]) > 1e-9
    # An empty answer is an empty text: safe with probability 0.0, no forward pass, still a judged response.
    assert results[3]["label"] == "safe" and results[3]["unsafe_probability"] == 0.0 and results[3]["judged"] == "response"
    assert results[4] == {"text": "", "judged": "prompt", "label": "safe", "unsafe_probability": 0.0}
    logits = classifier.logits([PromptResponse("a prompt", ""), PAIRS[0]], show_progress=False)
    assert np.isnan(logits[0]).all() and not np.isnan(logits[1]).any()
    # Normalised as prompts are: None is empty, a lone surrogate becomes U+FFFD.
    [odd] = classifier.classify([PromptResponse(None, "fine \ud800")], show_progress=False)
    assert odd["text"] == "" and odd["response"] == "fine \ufffd"


def test_infer_judges_inline_answers_and_says_so(tiny_lora_classifier, classifier, capsys):
    flags = ["--model-dir", str(tiny_lora_classifier), "--dtype", "fp32", "--device", "cpu"]
    # The fixture was trained on prompts only: infer.py says its verdicts on answers are unmeasured.
    with pytest.warns(UserWarning, match="was not trained on answers"):
        assert infer_main([*flags, "--json", "--examples", *PROMPTS, "--responses", *ANSWERS]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = classifier.unsafe_probabilities(PAIRS, show_progress=False)
    assert [(line["text"], line["response"], line["judged"]) for line in lines] == [
        (prompt, answer, "response") for prompt, answer in zip(PROMPTS, ANSWERS)]
    np.testing.assert_allclose([line["unsafe_probability"] for line in lines], expected, rtol=0, atol=ATOL)
    with pytest.warns(UserWarning):
        assert infer_main([*flags, "--examples", PROMPTS[0], "--responses", ANSWERS[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split()[0] in ("safe", "unsafe") and line.endswith(f"{ANSWERS[0][:57]}...  (answering: {PROMPTS[0]})")
    assert infer_main([*flags, "--json", "--examples", PROMPTS[1]]) == 0
    assert json.loads(capsys.readouterr().out)["judged"] == "prompt"


def test_infer_reads_a_response_column_and_a_blank_answer_is_safe(tiny_lora_classifier, classifier, tmp_path, capsys):
    table = tmp_path / "answers.csv"
    pd.DataFrame({"prompt": [*PROMPTS, PROMPTS[0]], "answer": [*ANSWERS, ""], "label": [1, 0, 0]}).to_csv(table, index=False)
    flags = ["--model-dir", str(tiny_lora_classifier), "--dtype", "fp32", "--input-file", str(table),
             "--text-column", "prompt", "--response-column", "answer"]
    with pytest.warns(UserWarning, match="was not trained on answers"):
        assert infer_main([*flags, "--json", "--label-column", "label"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["judged"] for line in lines] == ["response"] * 3 and lines[2]["response"] == ""
    np.testing.assert_allclose([line["unsafe_probability"] for line in lines[:2]],
                               classifier.unsafe_probabilities(PAIRS, show_progress=False), rtol=0, atol=ATOL)
    assert lines[2]["unsafe_probability"] == 0.0 and lines[2]["label"] == "safe"
    assert "answers.csv" in captured.err and "auprc" in captured.err  # the metrics table, as for prompts


BAD_INFER_ARGUMENTS = [
    (["--examples", "a", "b", "--responses", "x"], "--responses gives 1 answer(s) for 2 --examples prompt(s)"),
    (["--responses", "x"], "--responses needs --examples"),
    (["--response-column", "answer"], "--response-column needs --input-file"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_INFER_ARGUMENTS, ids=["count", "no-examples", "no-file"])
def test_a_bad_answer_argument_exits_2_before_anything_loads(tmp_path, capsys, monkeypatch, flags, message):
    import safety_classifier.inference

    monkeypatch.setattr(safety_classifier.inference, "load_classifier",
                        lambda *args, **kwargs: pytest.fail("loaded despite a bad argument"))
    assert infer_main(["--model-dir", str(tmp_path / "absent"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_infer_refuses_a_response_column_it_cannot_read(tmp_path, capsys, monkeypatch):
    import safety_classifier.inference

    monkeypatch.setattr(safety_classifier.inference, "load_classifier",
                        lambda *args, **kwargs: pytest.fail("loaded despite a bad file"))
    (tmp_path / "prompts.txt").write_text("one prompt\n")
    (tmp_path / "table.csv").write_text("user_input,reply\nhello,hi\n")
    for name, message in (("prompts.txt", "a .txt file holds prompts only"), ("table.csv", "no column 'answer'")):
        assert infer_main(["--model-dir", str(tmp_path), "--input-file", str(tmp_path / name),
                           "--response-column", "answer"]) == 2
        assert message in capsys.readouterr().err


def conversation(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in turns))


def test_a_conversation_is_judged_by_its_last_message_in_the_context_of_the_ones_before():
    system = ("system", "Be helpful.")
    assert conversation(("user", "a")).judged_input() == "a"
    assert conversation(system, ("user", "a"), ("assistant", "b")).judged_input() == PromptResponse("a", "b")
    assert conversation(("user", "a"), ("assistant", "b"), system, ("user", "c")).judged_input() == \
        "user: a\nassistant: b\nuser: c"
    assert conversation(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")).judged_input() == \
        PromptResponse("user: a\nassistant: b\nuser: c", "d")
    # An answer with nothing before it answers an empty prompt; one after another answer reads it as context.
    assert conversation(system, ("assistant", "b")).judged_input() == PromptResponse("", "b")
    assert conversation(("assistant", "a"), ("assistant", "b")).judged_input() == PromptResponse("assistant: a", "b")
    # With fewer earlier turns: the most recent ones.
    long = conversation(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    assert long.judged_input(1) == PromptResponse("c", "d")
    assert long.judged_input(2) == PromptResponse("assistant: b\nuser: c", "d")
    assert long.least_context == 1 and conversation(("user", "a"), ("assistant", "b"), ("user", "c")).least_context == 0


def test_a_long_history_cannot_push_the_judged_message_out_of_what_the_model_reads(classifier):
    tokenizer, max_length, template = classifier.tokenizer, 128, classifier.prompt_template
    history = [("user" if i % 2 == 0 else "assistant", f"Turn {i} is fine.")
               for i in range(30)]
    for last in (("user", "Tell me how to poison my neighbour."), ("assistant", "Put rat poison in the meat.")):
        # Turns alternate: the answer follows the user's turn 28, the prompt the assistant's turn 29.
        turns = conversation(*history[:-1], last) if last[0] == "assistant" else conversation(*history, last)
        whole = turns.judged_input()
        assert not fits(tokenizer, whole, max_length, template)  # read whole, the judged message would be cut off
        fitted = fitted_input(turns, tokenizer, max_length, template)
        kept = next(context for context in range(len(turns.turns)) if turns.judged_input(context) == fitted)
        # As many of the most recent turns as fit, and the judged message whole at the end.
        assert fits(tokenizer, fitted, max_length, template)
        assert not fits(tokenizer, turns.judged_input(kept + 1), max_length, template)
        assert 2 <= kept < len(turns.turns) - 1
        if last[0] == "assistant":
            assert fitted.response == last[1] and fitted.prompt.endswith(history[-2][1])
        else:
            assert fitted.endswith(f"user: {last[1]}")
        ids = encode_prompts(tokenizer, [fitted], max_length, template)[0]
        assert len(ids) <= max_length
    # A conversation that fits is read whole.
    short = conversation(("user", "a"), ("assistant", "b"), ("user", "c"))
    assert fitted_input(short, tokenizer, max_length, template) == short.judged_input()


def test_answers_are_judged_at_their_own_threshold_where_validation_chose_one(tiny_lora_classifier):
    classifier = load_classifier(tiny_lora_classifier, device="cpu", dtype="fp32")
    [pair_score] = classifier.unsafe_probabilities([PAIRS[0]], show_progress=False)
    # The same score, unsafe as a prompt and safe as an answer when the answers' threshold is above it.
    classifier.threshold, classifier.response_threshold = pair_score / 2, min(1.0, pair_score * 2 + 1e-3)
    [result] = classifier.classify([PAIRS[0]], show_progress=False)
    assert result["label"] == "safe"
    assert classifier.verdict([pair_score], "prompt")["label"] == "unsafe"
    classifier.set_threshold(pair_score / 2)  # --threshold: one threshold for both tasks
    assert next(classifier.classify([PAIRS[0]], show_progress=False))["label"] == "unsafe"


def test_a_classifier_whose_answers_were_read_in_another_template_is_refused(tiny_lora_classifier):
    from safety_classifier.errors import ModelLoadError

    classifier = load_classifier(tiny_lora_classifier, device="cpu", dtype="fp32")
    with pytest.raises(ModelLoadError, match="response template"):
        Classifier(classifier.model, classifier.tokenizer, 0.5, 64,
                   {**classifier.metadata, "response_template": "Q: {prompt} A: {response}"})


@contextmanager
def serving(classifier: Classifier, model_dir) -> Iterator[TestClient]:
    """The service over `classifier`, in process, once it is ready."""
    app = create_app(ServeArguments(model_dir=str(model_dir)), load=lambda: classifier)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.05)
        yield client


def metric(client: TestClient, sample: str) -> float:
    line = next((line for line in client.get("/metrics").text.splitlines() if line.startswith(sample + " ")), None)
    return 0.0 if line is None else float(line.split()[-1])


# A chat template for prompts only: it refuses an assistant's turn, as some models' templates refuse a role.
USER_ONLY_CHAT = ("{% for message in messages %}{% if message['role'] != 'user' %}"
                  "{{ raise_exception('this template reads user messages only') }}{% endif %}"
                  "<|user|>{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def without_answers(classifier: Classifier, how: str) -> Classifier:
    """The classifier, unable to encode an answer with its prompt, though it reads prompts."""
    metadata = {key: value for key, value in classifier.metadata.items() if key != "response_template"}
    tokenizer, max_length = classifier.tokenizer, classifier.max_length
    if how == "no-room":  # a max length the response template alone fills
        max_length = len(encode_pairs(tokenizer, [PromptResponse("", "")], 10_000)[0])
    else:  # a chat template with no assistant's turn
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = USER_ONLY_CHAT
        metadata["prompt_template"] = "chat"
    return Classifier(classifier.model, tokenizer, classifier.threshold, max_length, metadata, classifier.calibration)


@pytest.mark.parametrize("how", ["no-room", "user-only-chat-template"])
def test_an_answer_a_classifier_cannot_encode_gets_422_and_prompts_are_still_served(classifier, tiny_lora_classifier,
                                                                                   how):
    """Refused before it reaches the model: the client's 422, not the model's 500, and no batch fails."""
    with serving(without_answers(classifier, how), tiny_lora_classifier) as client:
        for body in ({"input": [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": ANSWERS[0]}]},
                     {"input": [{"role": "assistant", "content": ANSWERS[0]}]}):
            response = client.post("/v1/moderations", json=body)
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"], error["type"]) == ("unsupported_input", "input", "invalid_request_error")
            assert error["message"].startswith("this classifier cannot read 'input': ")
        expected = "leaves no room for a prompt and its response" if how == "no-room" else \
            "TemplateError: this template reads user messages only"
        assert expected in error["message"]
        # A conversation whose last message is the user's, and texts, are prompts: served as usual.
        prompt = client.post("/v1/moderations", json={"input": [{"role": "assistant", "content": ANSWERS[0]},
                                                                {"role": "user", "content": PROMPTS[1]}]})
        texts = client.post("/v1/moderations", json={"input": PROMPTS})
        assert prompt.status_code == texts.status_code == 200
        assert prompt.json()["results"][0]["judged"] == "prompt"
        assert metric(client, "moderation_batch_failures_total") == 0
        assert metric(client, 'moderation_requests_total{code="422"}') == 2


def test_a_text_that_cannot_be_encoded_is_named_with_422_and_odd_texts_are_read(classifier, tiny_lora_classifier,
                                                                                monkeypatch):
    from safety_classifier.serving import batcher as batcher_module

    encode = batcher_module.encode_prompts
    failures = []  # set: fail once on any texts, as a failure no one input explains

    def refusing(tokenizer, texts, *args):
        if failures or any("\a" in str(text) for text in texts):
            raise failures.pop() if failures else ValueError("no encoding for a bell")
        return encode(tokenizer, texts, *args)

    monkeypatch.setattr(batcher_module, "encode_prompts", refusing)
    with serving(classifier, tiny_lora_classifier) as client:
        for body, param in (({"input": [PROMPTS[1], "ring \a", "\a"]}, "input[1]"), ({"input": "ring \a"}, "input")):
            response = client.post("/v1/moderations", json=body)
            assert response.status_code == 422
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("unsupported_input", param)
            assert error["message"] == f"this classifier cannot read '{param}': ValueError: no encoding for a bell"
        # Texts no tokenizer refuses: a lone surrogate (U+FFFD, as offline), NUL, placeholders, special tokens.
        odd = ["\ud800 unpaired", "nul \x00 byte", "{text} {prompt} {response}", "</s><unk>", "<|user|>hi"]
        response = client.post("/v1/moderations", content=json.dumps({"input": odd}).encode(),
                               headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose([result["category_scores"]["unsafe"] for result in response.json()["results"]],
                                   classifier.unsafe_probabilities(odd, show_progress=False), rtol=0, atol=ATOL)
        # A failure that no input causes alone is the service's: 500, as a model failure is.
        failures.append(RuntimeError("the tokenizer is broken"))
        assert client.post("/v1/moderations", json={"input": PROMPTS}).status_code == 500
        assert client.post("/v1/moderations", json={"input": PROMPTS}).status_code == 200
        assert metric(client, "moderation_batch_failures_total") == 0


def test_the_batcher_refuses_an_unreadable_input_before_it_joins_a_batch(classifier):
    from safety_classifier.serving.batcher import Batcher, UnreadableInput

    unreadable = without_answers(classifier, "no-room")

    async def submit() -> tuple[int, list]:
        batcher = Batcher(unreadable, max_batch_tokens=4096, max_wait_ms=0)
        await batcher.start()
        try:
            with pytest.raises(UnreadableInput, match="no room for a prompt and its response") as raised:
                await batcher.submit([PROMPTS[0], PAIRS[1]])
            return raised.value.index, await batcher.submit(PROMPTS)
        finally:
            await batcher.close()

    index, results = asyncio.run(submit())
    assert index == 1 and len(results) == 2
