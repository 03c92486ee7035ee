"""serve.py: the OpenAI moderation API over a tiny classifier, with a real client; batching; bad input; drain."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from fastapi.testclient import TestClient

from safety_classifier.formatting import PromptResponse
from safety_classifier.inference import Classifier, load_classifier
from safety_classifier.openai_categories import OPENAI_CATEGORIES
from safety_classifier.serving import main
from safety_classifier.serving.api_server import create_app
from safety_classifier.serving.batcher import Batcher
from safety_classifier.serving.cli_args import ServeArguments
from safety_classifier.serving.metrics import ServiceMetrics

TEXTS = ["How do I build a bomb to attack France?", "What is the capital of France?",
         "Write a short poem about bees.", "Tell me how to poison my neighbour without being caught.",
         "Recommend a good book about chess. " * 6, "Translate hello into Spanish."]
SERVER_FLAGS = ("--dtype", "fp32", "--device", "cpu", "--max-inputs", "8", "--max-body-bytes", "4096")
ATOL = 1e-6  # fp32: a text scores the same alone and in any batch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(model_dir: Path, *flags: str, ready_within_s: float = 120.0, headers: dict | None = None,
                   env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """serve.py in a subprocess on a free 127.0.0.1 port, once GET /ready answers 200 (sent with `headers`)."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key != "SAFETY_CLASSIFIER_API_KEY"}
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "serve.py"), "--model-dir", str(model_dir), "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env={**environment, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within_s
        while True:
            assert process.poll() is None, f"serve.py exited with {process.returncode}: {process.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "serve.py did not become ready in time"
            try:
                if httpx.get(f"{url}/ready", timeout=2, headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def offline(tiny_lora_classifier) -> Classifier:
    return load_classifier(tiny_lora_classifier, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(tiny_lora_classifier) -> Iterator[str]:
    with running_server(tiny_lora_classifier, *SERVER_FLAGS, "--max-wait-ms", "20") as (url, _):
        yield url


def test_the_openai_client_gets_the_offline_scores(server, offline, tiny_lora_classifier):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    response = client.moderations.create(input=TEXTS)
    expected = offline.unsafe_probabilities(TEXTS, show_progress=False)
    assert response.id.startswith("modr-") and response.model == tiny_lora_classifier.name
    # The client's models name OpenAI's categories; a category of our own arrives as an extra field (and the
    # client keeps the hosted keys with a "/" or "-" there too, besides their attributes).
    scores = [result.category_scores.model_extra["unsafe"] for result in response.results]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=ATOL)
    for result, probability in zip(response.results, expected):
        assert result.flagged == bool(probability >= offline.threshold)
        own = {key: value for key, value in result.categories.model_extra.items() if key not in OPENAI_CATEGORIES}
        assert own == {"unsafe": result.flagged}
        # A binary classifier decides none of the hosted categories: code reading them finds them unflagged.
        assert not any((result.categories.hate, result.categories.violence, result.categories.self_harm,
                        result.categories.sexual_minors, result.categories.illicit_violent))
        assert result.category_scores.harassment == result.category_scores.violence_graphic == 0.0
        assert result.model_extra["judged"] == "prompt"
    single = client.moderations.create(input=TEXTS[0], model="anything")
    assert single.results[0].category_scores.model_extra["unsafe"] == pytest.approx(expected[0], abs=ATOL)


def test_concurrent_requests_get_their_own_offline_scores(server, offline):
    expected = offline.unsafe_probabilities(TEXTS, show_progress=False)

    async def ask_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/moderations", json={"input": text}) for text in TEXTS * 3))

    responses = asyncio.run(ask_all())
    assert [r.status_code for r in responses] == [200] * len(responses)
    scores = [r.json()["results"][0]["category_scores"]["unsafe"] for r in responses]
    np.testing.assert_allclose(scores, np.tile(expected, 3), rtol=0, atol=ATOL)


def test_an_empty_string_is_safe_with_probability_zero_as_in_infer(server):
    response = httpx.post(f"{server}/v1/moderations", json={"input": ["", "   ", TEXTS[1]]}, timeout=30)
    assert response.status_code == 200
    results = response.json()["results"]
    keys = ["unsafe", *OPENAI_CATEGORIES]
    for result in results[:2]:
        assert result == {"flagged": False, "categories": dict.fromkeys(keys, False),
                          "category_scores": dict.fromkeys(keys, 0.0),
                          "category_applied_input_types": {key: ["text"] for key in keys}, "judged": "prompt"}
    assert results[2]["category_scores"]["unsafe"] > 0.0


def test_a_conversation_from_the_openai_client_judges_its_last_message_as_offline(server, offline):
    """The client's extra_body replaces its `input`: one conversation, one result, about the last message."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    answer = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": TEXTS[3]}, {"role": "assistant", "content": "Mix these two chemicals."}]
    follow_up = [*answer, {"role": "user", "content": TEXTS[0]}]
    expected = offline.scores([PromptResponse(TEXTS[3], "Mix these two chemicals."),
                               f"user: {TEXTS[3]}\nassistant: Mix these two chemicals.\nuser: {TEXTS[0]}"],
                              show_progress=False)
    for messages, judged, row in ((answer, "response", expected[0]), (follow_up, "prompt", expected[1])):
        response = client.moderations.create(model="anything", input="ignored", extra_body={"input": messages})
        [result] = response.results
        assert result.model_extra["judged"] == judged
        assert result.category_scores.model_extra["unsafe"] == pytest.approx(row[0], abs=ATOL)
        assert result.flagged == bool(row[0] >= offline.threshold)
    # A blank answer is an empty text: safe with probability 0.0, as an empty prompt.
    blank = httpx.post(f"{server}/v1/moderations", json={"input": [{"role": "user", "content": TEXTS[0]},
                                                                   {"role": "assistant", "content": " "}]}, timeout=30)
    assert blank.json()["results"][0]["category_scores"]["unsafe"] == 0.0
    assert blank.json()["results"][0]["judged"] == "response"


def test_a_conversation_shares_a_batch_with_texts_and_each_gets_its_offline_score(offline):
    from safety_classifier.serving.conversation import Conversation, Message

    conversation = Conversation((Message("user", TEXTS[3]), Message("assistant", "Sure, here is how.")))
    metrics = ServiceMetrics()

    async def submit_together() -> tuple[list, int]:
        batcher = Batcher(offline, max_batch_tokens=4096, max_wait_ms=1500, metrics=metrics)
        await batcher.start()
        results = await asyncio.gather(batcher.submit([conversation]), batcher.submit(TEXTS[:2]))
        await batcher.close()
        return results, batcher.batches

    (judged_answer, prompts), batches = asyncio.run(submit_together())
    assert batches == 1 and [result.judged for result in (*judged_answer, *prompts)] == ["response", "prompt", "prompt"]
    expected = offline.unsafe_probabilities([PromptResponse(TEXTS[3], "Sure, here is how."), *TEXTS[:2]],
                                            show_progress=False)
    np.testing.assert_allclose([result.category_scores["unsafe"] for result in (*judged_answer, *prompts)], expected,
                               rtol=0, atol=ATOL)


BAD_REQUESTS = [
    (b'{"input": ', 400, "invalid_json"),
    (b'{"input": "\xff\xfe"}', 400, "invalid_json"),  # not UTF-8
    (b'["a list"]', 422, "invalid_type"),
    (b'{"inputs": "a typo"}', 422, "missing_input"),
    (b'{"input": 42}', 422, "invalid_type"),
    (b'{"input": ["fine", null]}', 422, "invalid_type"),
    (b'{"input": [{"type": "image_url", "image_url": {"url": "x"}}]}', 422, "invalid_type"),
    (b'{"input": []}', 422, "empty_input"),
    (b'{"input": "x", "model": 7}', 422, "invalid_type"),
    (json.dumps({"input": ["a"] * 9}).encode(), 413, "too_many_inputs"),
    (json.dumps({"input": "a" * 5000}).encode(), 413, "request_too_large"),
    (b'{"input": [{"role": "user", "content": "hi"}, "a string"]}', 422, "mixed_input"),
    (b'{"input": [{"content": "no role"}]}', 422, "missing_field"),
    (b'{"input": [{"role": "moderator", "content": "hi"}]}', 422, "invalid_value"),
    (b'{"input": [{"role": "user", "content": ["a", "list"]}]}', 422, "invalid_type"),
    (b'{"input": [{"role": "user", "content": "hi"}, {"role": "system", "content": "last"}]}', 422, "invalid_value"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_REQUESTS, ids=[case[2] + str(i) for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_an_openai_error_and_the_service_keeps_serving(server, body, status, code):
    response = httpx.post(f"{server}/v1/moderations", content=body, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert httpx.post(f"{server}/v1/moderations", json={"input": TEXTS[0]}, timeout=30).status_code == 200


def test_unknown_routes_answer_in_the_same_error_format(server):
    response = httpx.get(f"{server}/v1/nothing", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_health_ready_and_prometheus_metrics(server):
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready", timeout=10).status_code == 200
    httpx.post(f"{server}/v1/moderations", json={"input": TEXTS[0]}, timeout=30)
    metrics = httpx.get(f"{server}/metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ('moderation_requests_total{code="200"}', "moderation_request_duration_seconds_bucket",
                 "moderation_batch_size_count", "moderation_batch_requests_count", "moderation_ready 1.0"):
        assert name in metrics.text, name


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(tiny_lora_classifier):
    # A long gathering window keeps the request waiting in the batcher when SIGTERM arrives.
    with running_server(tiny_lora_classifier, *SERVER_FLAGS, "--max-wait-ms", "2000") as (url, process):
        answer: dict[str, httpx.Response] = {}
        request = threading.Thread(target=lambda: answer.update(
            response=httpx.post(f"{url}/v1/moderations", json={"input": TEXTS[0]}, timeout=30)))
        request.start()
        deadline = time.monotonic() + 10
        while "moderation_queued_requests 1.0" not in httpx.get(f"{url}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the request never reached the batcher"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        request.join(timeout=30)
        assert answer["response"].status_code == 200
        assert answer["response"].json()["results"][0]["category_scores"]["unsafe"] > 0
        assert process.wait(timeout=30) == 0
        stderr = process.stderr.read()
        assert "stopped: 1 moderation request(s) answered" in stderr
        assert "Traceback" not in stderr


def test_concurrent_requests_are_scored_in_one_batch(offline):
    texts = TEXTS + [""]
    metrics = ServiceMetrics()

    async def submit_together() -> tuple[list, int]:
        batcher = Batcher(offline, max_batch_tokens=4096, max_wait_ms=1500, metrics=metrics)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([text]) for text in texts))
        await batcher.close()
        return results, batcher.batches

    results, batches = asyncio.run(submit_together())
    assert batches == 1
    assert metrics.registry.get_sample_value("moderation_batch_size_sum") == len(texts)
    assert metrics.registry.get_sample_value("moderation_batch_requests_sum") == len(texts)
    scores = [result[0].category_scores["unsafe"] for result in results]
    np.testing.assert_allclose(scores, offline.unsafe_probabilities(texts, show_progress=False), rtol=0, atol=ATOL)


def test_the_heap_is_trimmed_after_each_answered_batch(offline, monkeypatch):
    from safety_classifier.serving import batcher as batcher_module
    from safety_classifier.serving import memory

    assert isinstance(memory.trim_free_heap(), bool)  # glibc here; elsewhere False, never an error
    trims = []
    monkeypatch.setattr(batcher_module, "trim_free_heap", lambda: trims.append(1) or True)

    async def two_batches(trim_heap: bool) -> list:
        batcher = Batcher(offline, max_batch_tokens=4096, max_wait_ms=0, trim_heap=trim_heap)
        await batcher.start()
        results = [await batcher.submit([text]) for text in TEXTS[:2]]
        await batcher.close()
        return results

    assert asyncio.run(two_batches(trim_heap=False)) and trims == []
    results = asyncio.run(two_batches(trim_heap=True))
    assert len(trims) == 2
    scores = [result[0].category_scores["unsafe"] for result in results]
    np.testing.assert_allclose(scores, offline.unsafe_probabilities(TEXTS[:2], show_progress=False), rtol=0, atol=ATOL)


def test_after_a_batch_the_batcher_waits_for_the_clients_it_answered(offline, monkeypatch):
    """Clients that send their next request as soon as they are answered: waiting for them
    (`return_wait_share`) gives N clients batches of N; without it, whoever is already waiting
    is scored at once and the clients split into groups taking turns."""
    from safety_classifier.serving import batcher as batcher_module

    sizes: list[int] = []
    score = batcher_module.score_texts

    def slow_score(classifier, texts, max_batch_tokens):
        sizes.append(len(texts))
        time.sleep(0.2)  # a batch long enough that the answered clients are back well within its share
        return score(classifier, texts, max_batch_tokens)

    monkeypatch.setattr(batcher_module, "score_texts", slow_score)

    async def clients(count: int, rounds: int) -> None:
        batcher = Batcher(offline, max_batch_tokens=4096, max_wait_ms=0, return_wait_share=1.0)
        await batcher.start()

        async def client(name: int) -> None:
            for round_ in range(rounds):
                await batcher.submit([f"{TEXTS[name]} ({round_})"])

        await asyncio.gather(*(client(name) for name in range(count)))
        await batcher.close()

    asyncio.run(clients(count=4, rounds=3))
    # The first batch holds whoever arrived first; from then on each batch holds every client.
    assert sum(sizes) == 12 and sizes[1:-1] == [4] * (len(sizes) - 2) and len(sizes) <= 4
    with pytest.raises(ValueError, match="return_wait_share"):
        Batcher(offline, return_wait_share=2.0)


def test_the_gather_budget_splits_what_does_not_fit_in_one_batch(offline):
    longest = max(len(ids) for ids in offline.tokenizer(TEXTS)["input_ids"])

    async def submit_together() -> int:
        batcher = Batcher(offline, max_batch_tokens=2 * longest, max_gather_tokens=longest, max_wait_ms=200)
        await batcher.start()
        await asyncio.gather(*(batcher.submit([text]) for text in TEXTS))
        await batcher.close()
        return batcher.batches

    assert 2 <= asyncio.run(submit_together()) < len(TEXTS)


def test_a_model_failure_fails_its_batch_with_500_and_the_next_request_succeeds(offline, tiny_lora_classifier, caplog):
    flaky = copy.copy(offline)
    failures = [RuntimeError("simulated model failure")]

    def scores(texts, **kwargs):
        if list(texts) == TEXTS[:2] and failures:  # not during the warm-up passes
            raise failures.pop()
        return offline.scores(texts, **kwargs)

    flaky.scores = scores
    app = create_app(ServeArguments(model_dir=str(tiny_lora_classifier)), load=lambda: flaky)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        failed = client.post("/v1/moderations", json={"input": TEXTS[:2]})
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "model_error" and failed.json()["error"]["type"] == "server_error"
        answered = client.post("/v1/moderations", json={"input": TEXTS[:2]})
        assert answered.status_code == 200
        np.testing.assert_allclose([r["category_scores"]["unsafe"] for r in answered.json()["results"]],
                                   offline.unsafe_probabilities(TEXTS[:2], show_progress=False), rtol=0, atol=ATOL)
        assert app.state.metrics.registry.get_sample_value("moderation_batch_failures_total") == 1
    assert "simulated model failure" in caplog.text


def test_the_model_is_loaded_warmed_up_and_run_on_one_thread(offline, tiny_lora_classifier):
    """PyTorch's OpenMP threads are per calling thread: torch work on a second thread slows every
    forward pass (serving.batcher.new_model_thread), so loading, warm-up and scoring share one thread."""
    threads: dict[str, set[str]] = {"load": set(), "score": set()}
    model = copy.copy(offline)

    def load() -> Classifier:
        threads["load"].add(threading.current_thread().name)
        return model

    def scores(texts, **kwargs):
        threads["score"].add(threading.current_thread().name)
        return offline.scores(texts, **kwargs)

    model.scores = scores
    app = create_app(ServeArguments(model_dir=str(tiny_lora_classifier)), load=load)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/v1/moderations", json={"input": TEXTS[:2]}).status_code == 200
    assert len(threads["load"]) == 1 and threads["score"] == threads["load"]
    assert next(iter(threads["load"])).startswith("moderation-model")


def test_a_half_precision_cpu_model_is_served_in_packs_only(offline, tiny_lora_classifier, monkeypatch):
    """Its pack lengths come in steps, all met in the warm-up (packing.PACK_TOKEN_MULTIPLE); padded
    batches would bring a new matrix shape per row count and length. fp32 keeps the cheaper plan."""
    from safety_classifier.serving.batcher import score_texts

    def served_plan(classifier: Classifier) -> bool | None:
        plans, scores = [], classifier.scores

        def recording_scores(texts, **kwargs):
            plans.append(kwargs["pack"])
            return scores(texts, **kwargs)

        monkeypatch.setattr(classifier, "scores", recording_scores)
        assert score_texts(classifier, TEXTS, None).shape == (len(TEXTS), 1)
        [plan] = plans
        return plan

    assert served_plan(load_classifier(tiny_lora_classifier, dtype="bf16", device="cpu")) is True
    assert served_plan(offline) is None


def test_requests_before_the_model_is_ready_get_503(tiny_lora_classifier, offline):
    loaded = threading.Event()

    def slow_load() -> Classifier:
        loaded.wait(timeout=30)
        return offline

    app = create_app(ServeArguments(model_dir=str(tiny_lora_classifier)), load=slow_load)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503
        response = client.post("/v1/moderations", json={"input": "hello"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_ready"
        loaded.set()


def test_a_model_that_fails_to_load_is_reported_and_stops_the_server(tiny_lora_classifier, caplog):
    from safety_classifier.errors import ModelLoadError

    def broken_load() -> Classifier:
        raise ModelLoadError("the weights are unreadable")

    stopped: list[BaseException] = []
    app = create_app(ServeArguments(model_dir=str(tiny_lora_classifier)), load=broken_load, on_load_failure=stopped.append)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while not stopped:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/ready").json()["status"] == "failed"
        assert client.post("/v1/moderations", json={"input": "hello"}).status_code == 503
    assert "cannot serve" in caplog.text and "the weights are unreadable" in caplog.text


def test_serve_refuses_an_incomplete_directory(tmp_path, capsys):
    assert main(["--model-dir", str(tmp_path)]) == 2
    assert "safety_classifier.json is missing" in capsys.readouterr().err


BAD_ARGUMENTS = [
    (("--return-wait-share", "2"), "--return-wait-share must be between 0 and 1"),
    (("--malloc-arenas", "-1"), "--malloc-arenas must be 0"),
    (("--max-inputs", "0"), "--max-inputs must be at least 1"),
    (("--max-wait-ms", "-5"), "--max-wait-ms must be 0 or more"),
    (("--port", "70000"), "--port must be between 0 and 65535"),
    (("--threshold", "1.5"), "--threshold must be between 0 and 1"),
    (("--max-batch-tokens", "0"), "--max-batch-tokens must be at least 1"),
    (("--api-key", ""), "--api-key is empty"),
    (("--api-key", "two words"), "--api-key must be printable ASCII without spaces"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_ARGUMENTS, ids=[flags[0] for flags, _ in BAD_ARGUMENTS])
def test_a_bad_serve_argument_exits_2_before_anything_loads(tmp_path, capsys, monkeypatch, flags, message):
    import safety_classifier.artifacts
    import safety_classifier.inference

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded despite a bad argument")

    monkeypatch.setattr(safety_classifier.artifacts, "read_metadata", must_not_load)
    monkeypatch.setattr(safety_classifier.inference, "load_classifier", must_not_load)
    # The directory does not exist either: the argument is what is reported.
    assert main(["--model-dir", str(tmp_path / "absent"), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and "absent" not in error


def test_request_errors_keep_their_openai_messages_and_params():
    from safety_classifier.serving.protocol import ApiError, parse_moderation_request

    expected = [
        (b'{"input": ["fine", {"type": "image_url"}]}', 422, "invalid_type", "input[1]",
         "'input[1]' must be a string (text only), not an 'image_url' part"),
        (b'{"input": 42, "model": 7}', 422, "invalid_type", "model", "'model' must be a string, not number"),
        (b'{"model": 7}', 422, "missing_input", "input", "'input' is required: a string or an array of strings"),
        (b'[1]', 422, "invalid_type", None, "the request body must be a JSON object, not array"),
        (b'{"input": ["a", "b", "c"]}', 413, "too_many_inputs", "input",
         "'input' has 3 texts; at most 2 are accepted in one request"),
        (b'{"input": [{"role": "user", "content": "hi"}, 7]}', 422, "mixed_input", "input[1]",
         "'input[1]' is a number, but 'input' holds messages: send texts, or one conversation of messages with a "
         "role and a content, not both"),
        (b'{"input": ["hi", {"role": "user", "content": "hi"}]}', 422, "mixed_input", "input[0]",
         "'input[0]' is a string, but 'input' holds messages: send texts, or one conversation of messages with a "
         "role and a content, not both"),
        (b'{"input": [{"role": "user", "content": "hi"}, {"content": "x"}]}', 422, "missing_field", "input[1].role",
         "'input[1]' has no 'role' (user, assistant or system)"),
        (b'{"input": [{"role": null, "content": "x"}]}', 422, "invalid_value", "input[0].role",
         "'input[0].role' must be user, assistant or system, not null"),
        (b'{"input": [{"role": "assistant"}]}', 422, "missing_field", "input[0].content",
         "'input[0]' has no 'content' (a string)"),
        (b'{"input": [{"role": "user", "content": {"type": "text"}}]}', 422, "invalid_type", "input[0].content",
         "'input[0].content' must be a string (text only), not object"),
        (b'{"input": [{"role": "system", "content": "be nice"}]}', 422, "invalid_value", "input[0].role",
         "the last message is the one judged: it must be the user's or the assistant's, not the system's"),
    ]
    for body, status, code, param, message in expected:
        with pytest.raises(ApiError) as raised:
            parse_moderation_request(body, max_inputs=2)
        error = raised.value.body().error
        assert (raised.value.status, error.code, error.param, error.message) == (status, code, param, message)
        assert error.type == "invalid_request_error"
    request = parse_moderation_request(b'{"input": ["a", {"type": "text", "text": "b"}], "model": "m", "x": 1}', 2)
    assert request.input == ["a", "b"] and request.model == "m"
    # A conversation is one input however many messages it has (more than --max-inputs here).
    messages = [{"role": role, "content": f"turn {i}", "name": "extra fields are ignored"}
                for i, role in enumerate(["system", "user", "assistant", "user"])]
    [conversation] = parse_moderation_request(json.dumps({"input": messages}).encode(), 2).input
    assert [message.role for message in conversation.messages] == ["system", "user", "assistant", "user"]


def test_the_load_test_splits_rss_into_anonymous_and_file_backed_pages():
    import os

    import load_test

    parts = load_test.rss_parts_mb(os.getpid())
    assert set(parts) == {"RssAnon", "RssFile", "RssShmem"}
    # the split adds up to the RSS psutil reads (a few pages may move between the two reads)
    assert abs(sum(parts.values()) - load_test.rss_mb(os.getpid())) < 16
    assert load_test.rss_parts_mb(2**22 + 12345) == {}  # no such process: no split, no error


def test_the_load_tests_malformed_requests_get_the_status_it_expects():
    """benchmarks/load_test.py --quick takes ~30 s here, too long for the suite; its parts are checked instead."""
    import load_test

    from safety_classifier.serving.protocol import ApiError, parse_moderation_request

    for kind, body, status in load_test.bad_requests(max_inputs=8):
        with pytest.raises(ApiError) as raised:
            parse_moderation_request(body, max_inputs=8)
        assert raised.value.status == status, kind
    exposition = 'moderation_batch_size_count 3.0\nmoderation_batch_size_sum 7.0\nmoderation_requests_total{code="200"} 2.0\n' \
                 'moderation_requests_total{code="422"} 1.0\n'
    assert load_test.metric_value(exposition, "moderation_batch_size_sum") == 7.0
    assert load_test.metric_value(exposition, "moderation_requests_total") == 3.0
    # The requests are cut into consecutive segments, each served and scored offline back to back,
    # offline first in every other one; the ratio is total offline over total served time.
    parts = load_test.segment_order(10, 3)
    assert [part.tolist() for part in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [part.tolist() for part in load_test.segment_order(2, 10)] == [[0], [1]]
    assert [load_test.offline_first(number) for number in range(4)] == [True, False, True, False]
    ratios = load_test.throughput_ratios(served_s=[10.0, 20.0, 10.0], offline_s=[8.0, 10.0, 12.0])
    assert ratios["served_vs_offline_ratio"] == 0.75
    assert ratios["served_vs_offline_by_segment"] == [0.8, 0.5, 1.2]
    assert ratios["served_vs_offline_median"] == 0.8 and ratios["served_vs_offline_range"] == [0.5, 1.2]

    # The batch-size ceiling scores the same prompts in one call and in consecutive served-size
    # batches, timed one, the other twice, the first again, and reports how far a score moved with
    # its batch (here: 0.01 per text in the call); a bf16 model on CPU, whose kernels are built per
    # shape, does each way once untimed first.
    class RecordingClassifier:
        def __init__(self, dtype: torch.dtype):
            self.model, self.calls = torch.nn.Linear(1, 1, dtype=dtype), []

        def unsafe_probabilities(self, texts, show_progress=True):
            self.calls.append(list(texts))
            return np.full(len(texts), 0.01 * len(texts))

    prompts = [f"prompt {i}" for i in range(10)]
    one_call, batched = [prompts], [prompts[0:4], prompts[4:8], prompts[8:10]]
    timed = one_call + 2 * batched + one_call
    for dtype, calls in ((torch.float32, timed), (torch.bfloat16, one_call + batched + timed)):
        classifier = RecordingClassifier(dtype)
        ceiling = load_test.batch_size_ceiling(classifier, prompts, batch_size=4)
        assert classifier.calls == calls
        assert load_test.builds_kernels_per_shape(classifier) == (dtype == torch.bfloat16)
        assert ceiling["ceiling_prompts"] == 10 and ceiling["ceiling_batch_size"] == 4
        assert ceiling["batch_size_ceiling"] > 0
        assert ceiling["offline_batch_difference"] == pytest.approx(0.10 - 0.02)


def test_the_load_test_sends_a_share_of_conversations_and_expects_their_answers_judged(tmp_path):
    import load_test

    from safety_classifier.serving.protocol import parse_moderation_request

    absent = str(tmp_path / "absent.csv")  # the built-in prompts and answers
    prompts, source, plan, order = load_test.request_plan(absent, 20, 0.1, 8, 0, conversation_share=0.5,
                                                          conversation_file=absent)
    pairs = [value for value in prompts if isinstance(value, PromptResponse)]
    assert len(prompts) == 18 and len(pairs) == 9 and len(plan) == len(order) == 20 and "built-in answers" in source
    for value, (kind, body) in zip(prompts, plan):
        [parsed] = parse_moderation_request(body, 8).input
        # What the server judges is what the load test scores offline.
        assert kind == "good" and (parsed.judged_input() if isinstance(value, PromptResponse) else parsed) == value
    assert load_test.request_plan(absent, 20, 0.1, 8, 0)[0] == load_test.request_plan(absent, 20, 0.1, 8, 0, 0.0)[0]


def test_the_load_tests_tolerance_is_twice_the_largest_offline_difference_over_all_prompts():
    import load_test

    # Columns: P(unsafe) then two categories; the malformed requests' rows are never scored (NaN).
    first_pass = np.array([[0.50, 0.1, 0.2], [0.30, 0.4, 0.4], [0.90, 0.0, 0.0]])
    segment_calls = np.array([[0.51, 0.1, 0.2], [0.30, 0.4, 0.43], [np.nan, np.nan, np.nan]])
    difference = load_test.offline_pass_difference(first_pass, segment_calls)
    assert difference["offline_pass_difference"] == pytest.approx(0.03)
    assert difference["offline_pass_difference_p999"] == pytest.approx(0.03, abs=1e-4)
    ceiling = {"offline_batch_difference": 0.02}
    assert load_test.accepted_tolerance(1e-3, ceiling, difference) == pytest.approx(0.06)
    assert load_test.accepted_tolerance(1e-3, ceiling, {}) == pytest.approx(0.04)
    assert load_test.accepted_tolerance(0.5, ceiling, difference) == 0.5
    assert load_test.accepted_tolerance(1e-3, {}, {}) == 1e-3


def test_the_load_test_checks_served_scores_and_flags_against_the_offline_verdict():
    import load_test

    from safety_classifier.inference import Classifier

    binary = Classifier(model=None, tokenizer=None, threshold=0.5, max_length=16)
    answer = {"flagged": True, "category_scores": {"unsafe": 0.62}}
    assert load_test.check_answer(binary, answer, np.array([0.6]), 1e-3) == (pytest.approx(0.02), False)
    assert load_test.check_answer(binary, {**answer, "flagged": False}, np.array([0.6]), 1e-3)[1]
    assert not load_test.check_answer(binary, {**answer, "flagged": False}, np.array([0.5005]), 1e-3)[1]  # at the threshold
    # An answer is held to the answers' own threshold, where the classifier has one.
    answers = Classifier(model=None, tokenizer=None, threshold=0.5, max_length=16, metadata={"response_threshold": 0.3})
    assert not load_test.check_answer(answers, {"flagged": True, "category_scores": {"unsafe": 0.4}}, np.array([0.4]),
                                      1e-3, "response")[1]
    assert load_test.check_answer(answers, {"flagged": True, "category_scores": {"unsafe": 0.4}}, np.array([0.4]),
                                  1e-3, "prompt")[1]
    # A category classifier answers with its categories' scores, and its route can flag a low P(unsafe).
    metadata = {"categories": [{"code": "S1", "name": "Violent Crimes", "threshold": 0.6},
                               {"code": "S6", "name": "Privacy", "threshold": 0.6}],
                "category_score_rule": "conditional", "category_route_threshold": 0.25}
    categories = Classifier(model=None, tokenizer=None, threshold=0.5, max_length=16, metadata=metadata)
    routed = {"flagged": True, "category_scores": {"S1": 0.05, "S6": 0.31}}
    assert load_test.check_answer(categories, routed, np.array([0.1, 0.05, 0.3]), 1e-3) == (pytest.approx(0.01), False)
    assert load_test.check_answer(categories, {**routed, "flagged": False}, np.array([0.1, 0.05, 0.3]), 1e-3)[1]


def test_malloc_arenas_are_capped_on_glibc_unless_the_environment_says_otherwise():
    import platform

    code = "from safety_classifier.serving.memory import limit_malloc_arenas as cap; print(cap(2), cap(0))"
    environment = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    for extra, expected in (({}, [str(platform.libc_ver()[0] == "glibc"), "False"]),
                            ({"MALLOC_ARENA_MAX": "4"}, ["False", "False"])):
        result = subprocess.run([sys.executable, "-c", code], env={**environment, **extra}, capture_output=True,
                                text=True, cwd=REPO_ROOT, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_warm_up_pages_in_every_weight_of_a_memory_mapped_model(offline, tmp_path, monkeypatch):
    import torch
    from serving_memory import resident_mib_by_mapping

    from safety_classifier.serving import batcher as batcher_module
    from safety_classifier.serving import memory

    def resident_mib(path: Path) -> float:
        return resident_mib_by_mapping().get(path.name, 0.0)

    # As from_pretrained leaves safetensors weights: backed by the file, a page resident once read.
    weights_file = tmp_path / "embedding.bin"
    weights_file.write_bytes(bytes(16 << 20))
    embedding = torch.nn.Embedding(4096, 1024)
    embedding.weight = torch.nn.Parameter(torch.from_file(str(weights_file), shared=True, size=4096 * 1024),
                                          requires_grad=False)
    embedding.weight.data = embedding.weight.data.view(4096, 1024)
    embedding(torch.tensor([7]))  # a forward pass reads its tokens' rows only
    assert resident_mib(weights_file) <= 4  # the pages around one row (fault-around), not 16 MiB
    assert memory.page_in_weights(embedding) == 16 << 20
    assert resident_mib(weights_file) == 16

    paged = []
    monkeypatch.setattr(batcher_module, "page_in_weights", lambda model: paged.append(model) or 0)

    async def warm_up() -> None:
        batcher = Batcher(offline, max_batch_tokens=256)
        await batcher.start()
        await batcher.warm_up()
        await batcher.close()

    asyncio.run(warm_up())
    assert paged == [offline.model]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_serving_memory_probe_reports_rss_and_the_mappings_that_grew(tiny_lora_classifier, toy_files, capsys):
    import serving_memory

    flags = ["--model-dir", str(tiny_lora_classifier), "--data-file", str(toy_files["train"]),
             "--batches", "4", "--batch-size", "3", "--every", "2"]
    assert serving_memory.main(flags) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["page_in"] is True and len(report["rss_mb_trace"]) == 2
    assert report["rss_mb_after_warm_up"] > 0 and len(report["grown_mappings_mb"]) == 4
