"""serve.py's API key: every route but /health refuses a request without `Authorization: Bearer <key>`."""

from __future__ import annotations

import logging
import re
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serving import ATOL, SERVER_FLAGS, TEXTS, running_server

from safety_classifier.arguments import ArgumentError
from safety_classifier.inference import Classifier, load_classifier
from safety_classifier.serving import main
from safety_classifier.serving.api_server import create_app
from safety_classifier.serving.auth import OPEN_PATHS
from safety_classifier.serving.cli_args import API_KEY_ENVIRONMENT, ServeArguments

KEY = "sk-local-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
# Everything a client might send instead of the key: nothing, another key, the key without its scheme or
# under another, a longer key that starts with it, an empty token.
WRONG_CREDENTIALS = [{}, {"authorization": "Bearer sk-local-guess"}, {"authorization": KEY},
                     {"authorization": f"Basic {KEY}"}, {"authorization": f"Bearer {KEY}0"}, {"authorization": "Bearer "}]


@pytest.fixture(scope="module")
def offline(tiny_lora_classifier) -> Classifier:
    return load_classifier(tiny_lora_classifier, device="cpu", dtype="fp32")


def wait_until_ready(client: TestClient, headers: dict | None = None) -> None:
    deadline = time.monotonic() + 60
    while client.get("/ready", headers=headers).status_code != 200:
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.05)


def refusals(client: TestClient) -> float:
    import load_test

    return load_test.metric_value(client.get("/metrics", headers=AUTH).text, "moderation_auth_refusals_total")


def test_with_a_key_no_route_but_health_answers_without_it(offline, tiny_lora_classifier):
    """Every route the app has, with every method it allows, so that a route added later is covered too."""
    app = create_app(ServeArguments(model_dir=str(tiny_lora_classifier), api_key=KEY), load=lambda: offline)
    with TestClient(app) as client:
        wait_until_ready(client, AUTH)
        routes = [(route.path, sorted(route.methods)) for route in app.routes if getattr(route, "methods", None)]
        assert {path for path, _ in routes} >= {"/health", "/ready", "/metrics", "/v1/moderations"}
        refused = 0
        for path, methods in routes:
            url = re.sub(r"\{[^}/]+\}", "x", path)  # a path parameter, should a route gain one
            for method in methods:
                for headers in WRONG_CREDENTIALS:
                    response = client.request(method, url, headers=headers)
                    if path in OPEN_PATHS:
                        assert response.status_code == 200, (method, path)
                        continue
                    assert response.status_code == 401, (method, path, headers)
                    assert response.headers["www-authenticate"] == "Bearer"
                    if method != "HEAD":
                        error = response.json()["error"]
                        assert set(error) == {"message", "type", "param", "code"}
                        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
                        assert KEY not in error["message"]
                    refused += 1
                assert client.request(method, url, headers=AUTH).status_code != 401, (method, path)
        # A path no route has is refused too: without the key nothing tells which paths exist.
        assert client.get("/v1/nothing").status_code == 401
        assert client.get("/v1/nothing", headers=AUTH).status_code == 404
        assert refusals(client) == refused + 1
        # The scheme is case-insensitive (RFC 7235), and the key answers as the open service would.
        answered = client.post("/v1/moderations", json={"input": TEXTS[:2]}, headers={"authorization": f"bearer {KEY}"})
        assert answered.status_code == 200
        np.testing.assert_allclose([result["category_scores"]["unsafe"] for result in answered.json()["results"]],
                                   offline.unsafe_probabilities(TEXTS[:2], show_progress=False), rtol=0, atol=ATOL)


def test_the_openai_client_sends_its_key_and_a_wrong_key_is_an_authentication_error(tiny_lora_classifier, offline):
    import load_test
    import openai

    # The flag wins over the environment: the environment's key is then a wrong one.
    with running_server(tiny_lora_classifier, *SERVER_FLAGS, "--api-key", KEY, "--log-level", "info", headers=AUTH,
                        env={API_KEY_ENVIRONMENT: "sk-from-the-environment"}) as (url, process):
        client = openai.OpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0, timeout=30)
        response = client.moderations.create(input=TEXTS)
        np.testing.assert_allclose([result.category_scores.model_extra["unsafe"] for result in response.results],
                                   offline.unsafe_probabilities(TEXTS, show_progress=False), rtol=0, atol=ATOL)
        for wrong in ("sk-from-the-environment", KEY.upper()):
            with pytest.raises(openai.AuthenticationError) as refused:
                openai.OpenAI(api_key=wrong, base_url=f"{url}/v1", max_retries=0, timeout=30).moderations.create(
                    input=TEXTS[0])
            assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 401
        assert load_test.refused_without_the_key(url, KEY)
    log = process.stderr.read()
    assert "API key required" in log and KEY not in log and "Traceback" not in log


def test_the_key_comes_from_the_flag_or_else_the_environment(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(API_KEY_ENVIRONMENT, "sk-environment")
    assert ServeArguments(model_dir="m").api_key == "sk-environment"
    assert ServeArguments(model_dir="m", api_key="sk-flag").api_key == "sk-flag"
    assert "sk-flag" not in repr(ServeArguments(model_dir="m", api_key="sk-flag"))
    monkeypatch.setenv(API_KEY_ENVIRONMENT, "")
    with pytest.raises(ArgumentError, match=f"{API_KEY_ENVIRONMENT} is empty"):
        ServeArguments(model_dir="m")
    assert main(["--model-dir", str(tmp_path / "absent")]) == 2  # refused before the directory is read
    assert f"{API_KEY_ENVIRONMENT} is empty" in capsys.readouterr().err
    monkeypatch.setenv(API_KEY_ENVIRONMENT, "sk-with-ü")
    with pytest.raises(ArgumentError, match="printable ASCII"):
        ServeArguments(model_dir="m")
    monkeypatch.delenv(API_KEY_ENVIRONMENT)
    assert ServeArguments(model_dir="m").api_key is None


def test_without_a_key_the_start_up_line_says_the_service_is_open(tiny_lora_classifier, offline, caplog):
    caplog.set_level(logging.INFO, logger="safety_classifier.serving")
    app = create_app(ServeArguments(model_dir=str(tiny_lora_classifier), port=8123), load=lambda: offline)
    with TestClient(app) as client:
        wait_until_ready(client)
        assert client.post("/v1/moderations", json={"input": TEXTS[0]}).status_code == 200
        assert refusals(client) == 0
    opened = [record for record in caplog.records if "no API key: anyone who reaches 127.0.0.1:8123 can use it"
              in record.getMessage()]
    assert opened and opened[0].levelno == logging.INFO
    assert any(record.getMessage().startswith("ready:") and "no API key" in record.getMessage()
               for record in caplog.records)

    # Open on every interface: a warning, before the model loads.
    caplog.clear()
    stopped: list[BaseException] = []

    def broken_load() -> Classifier:
        raise RuntimeError("not loaded")

    exposed = create_app(ServeArguments(model_dir=str(tiny_lora_classifier), host="0.0.0.0", port=8123),
                         load=broken_load, on_load_failure=stopped.append)
    with TestClient(exposed):
        deadline = time.monotonic() + 10
        while not stopped:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    [warning] = [record for record in caplog.records if "anyone who reaches 0.0.0.0:8123" in record.getMessage()]
    assert warning.levelno == logging.WARNING
