"""A moderation service: the OpenAI `POST /v1/moderations` API over a saved classifier.

Applications that already call the hosted moderation API point their client's base URL here.

Design: each request is parsed and checked on the event loop, its texts are counted in tokens
(on a tokenizer thread of their own), and a `Batcher` task gathers the requests waiting in its
queue into one batch, up to a budget of real tokens or a few milliseconds after the oldest
arrived. The batch is scored by one `Classifier.scores` call on one model thread,
which sorts its texts by length and runs them in forward passes of at most `max_batch_tokens`
padded tokens, as `infer.py` does: the event loop is never blocked by the model, and a prompt
of 500 tokens is not padded together with 30 of 15. Probabilities are
those of `infer.py` for the same texts: the same method, tokenization and empty-prompt rule.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import functools
import json
import logging
import os
import signal
import sys
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.utils import logging as transformers_logging

from .console import quiet_library_noise
from .errors import SafetyClassifierError
from .formatting import encode_prompts, normalise_prompt
from .inference import Classifier, default_batch_tokens
from .modeling import dtype_name
from .packing import MAX_PACK_TOKENS, scores_in_stepped_packs, warm_up_shapes

logger = logging.getLogger("safety_classifier.serving")

BINARY_CATEGORY = "unsafe"
MAX_BATCH_ROWS = 256  # texts gathered into one scoring call at most (also `token_budget_batches`' row cap)
GATHERED_FORWARD_PASSES = 4  # default real-token budget of a gathered batch, in forward passes' budgets
WARM_UP_TEXTS = ("What is the capital of France?", "Tell me how to shoplift from a supermarket without being seen.")


@dataclass
class ServeArguments:
    model_dir: str = field(metadata={"help": "A classifier directory written by a train_*.py script."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ...; default: cuda if present."})
    dtype: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={"help": "Compute dtype for scoring."})
    base_model: str | None = field(
        default=None, metadata={"help": "Override the adapter's base model reference (e.g. a local copy)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the base model."})
    threshold: float | None = field(default=None, metadata={"help": "Override the stored decision threshold."})
    model_name: str | None = field(
        default=None, metadata={"help": "The `model` named in responses; default: the model directory's name."}
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Padded tokens (rows x longest row) of one forward pass; 2048 on CPU, 16384 on GPU."},
    )
    max_gather_tokens: int | None = field(
        default=None,
        metadata={"help": "Real tokens of the requests gathered into one scoring call (sorted by length there and "
                          "run in passes of --max-batch-tokens); default 4 x --max-batch-tokens."},
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "How long the oldest waiting request may wait for others to share its batch."}
    )
    return_wait_share: float = field(
        default=0.05,
        metadata={"help": "After a batch, wait up to this share of its model time for the clients it answered to "
                          "send their next requests, so that they join the next batch (0: do not wait)."},
    )
    max_inputs: int = field(default=128, metadata={"help": "Most texts in one request (more: 413)."})
    max_body_bytes: int = field(default=1_048_576, metadata={"help": "Largest request body in bytes (larger: 413)."})
    graceful_timeout: int = field(
        default=30, metadata={"help": "Seconds SIGTERM waits for requests in flight before cancelling them."}
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata={"help": "Logging level."})
    malloc_arenas: int = field(
        default=2,
        metadata={"help": "glibc malloc arenas of the process (0: glibc's default, up to 8 per core; ignored when "
                          "MALLOC_ARENA_MAX is set or the C library is not glibc)."},
    )
    trim_heap: bool = field(
        default=True,
        metadata={"help": "After each batch, hand the heap's free pages back to the system (glibc's malloc_trim, on "
                          "the model thread): keeps memory flat under traffic."},
    )


# --------------------------------------------------------------------------------------------- scoring


def new_model_thread() -> ThreadPoolExecutor:
    """The one thread that loads the model and runs all its work. PyTorch's OpenMP threads are per
    calling thread: torch work on a second thread (loading included) adds a second team, and with
    more OpenMP threads than cores libgomp stops spinning between parallel regions, for every team.
    Scored on a second thread, the demo classifier ran at 0.77 of its rate on the loading thread,
    and at 0.85 back there (2 cores, bf16; benchmarks/scoring_threads.py, README *Under load*)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="moderation-model")


def score_texts(classifier: Classifier, texts: Sequence[str], max_batch_tokens: int | None) -> np.ndarray:
    """`Classifier.scores` (P(unsafe), then the categories' scores), so that whatever the
    classifier applies (its calibration, the empty-prompt rule) applies here too.

    A half-precision CPU model scores packs only: their lengths come in steps of
    `PACK_TOKEN_MULTIPLE`, all met in the warm-up, so traffic brings no new matrix shape and the
    service's memory stays flat (padded batches have a shape per row count and length)."""
    pack = True if scores_in_stepped_packs(classifier.model) else None
    scores = classifier.scores(texts, max_batch_tokens=max_batch_tokens, show_progress=False, pack=pack)
    return np.asarray(scores, dtype=np.float64)


def moderation_result(verdict: dict) -> dict[str, Any]:
    """One OpenAI moderation result from `Classifier.verdict`: `flagged` is the classifier's own
    decision; the categories are the classifier's (S1-S12) or, for a binary one, just "unsafe"."""
    flagged = verdict["label"] == "unsafe"
    flags = verdict.get("categories", {BINARY_CATEGORY: flagged})
    scores = verdict.get("category_scores", {BINARY_CATEGORY: verdict["unsafe_probability"]})
    return {
        "flagged": flagged,
        "categories": flags,
        "category_scores": scores,
        "category_applied_input_types": {name: ["text"] for name in flags},
    }


# --------------------------------------------------------------------------------------------- metrics


class ServiceMetrics:
    """Prometheus metrics in a registry of their own (one per app, so in-process tests do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("moderation_requests", "POST /v1/moderations requests by HTTP status.",
                                ["code"], registry=self.registry)
        self.latency = Histogram(
            "moderation_request_duration_seconds", "Time from request to response, POST /v1/moderations.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry,
        )
        self.inputs = Counter("moderation_inputs", "Texts scored.", registry=self.registry)
        self.batch_texts = Histogram("moderation_batch_size", "Texts per batch scored in one call to the model.",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.batch_requests = Histogram("moderation_batch_requests", "Requests gathered into one batch.",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram(
            "moderation_batch_duration_seconds", "Model time per batch.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )
        self.batch_failures = Counter("moderation_batch_failures", "Batches whose scoring raised.", registry=self.registry)
        self.queued = Gauge("moderation_queued_requests", "Requests waiting for, or in, a batch.", registry=self.registry)
        self.ready = Gauge("moderation_ready", "1 once the model is loaded and warmed up.", registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------- batching


class ServiceUnavailable(Exception):
    """The batcher is not running (not started yet, or draining for shutdown)."""


@dataclass
class _Job:
    texts: list[str]
    lengths: list[int]
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Gathers concurrent requests into batches scored on one model thread.

    Requests wait in a deque; the batching task takes the oldest, then every request that is
    already waiting or arrives until `max_wait_ms` after the oldest arrived, while their real
    tokens stay within `max_gather_tokens` (and their texts within 256). One
    `scores` call scores the batch: it sorts the texts by length and pads each
    forward pass of at most `max_batch_tokens` to its own longest text, so requests of any mix of
    lengths share a call without padding short prompts to long ones. While a batch is on the
    model thread the next one waits in the deque. After a batch, the batcher waits up to
    `return_wait_share` of its model time for as many new requests as it answered: clients that
    send their next request once answered then share one batch instead of taking turns in two.
    A batch whose scoring raises fails its own requests only.
    """

    def __init__(self, classifier: Classifier, *, max_batch_tokens: int | None = None, max_wait_ms: float = 5.0,
                 max_gather_tokens: int | None = None, metrics: ServiceMetrics | None = None,
                 trim_heap: bool = False, model_thread: ThreadPoolExecutor | None = None,
                 return_wait_share: float = 0.0) -> None:
        if not 0.0 <= return_wait_share <= 1.0:
            raise ValueError(f"return_wait_share must be between 0 and 1, not {return_wait_share}")
        self.classifier = classifier
        self.names = tuple(classifier.category_codes) or (BINARY_CATEGORY,)
        device = next(classifier.model.parameters()).device if hasattr(classifier.model, "parameters") else None
        self.max_batch_tokens = max_batch_tokens or (default_batch_tokens(device) if device is not None else 2048)
        self.max_gather_tokens = max_gather_tokens or GATHERED_FORWARD_PASSES * self.max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.return_wait_share = return_wait_share
        self._arrivals = 0  # requests queued since the service started
        self.metrics = metrics or ServiceMetrics()
        self.trim_heap = trim_heap
        self.batches = 0
        # The model thread runs every forward pass (pass the one that loaded the model: `new_model_thread`);
        # the tokenizer thread counts tokens with its own copy of the tokenizer (a fast tokenizer used
        # from two threads at once can fail with "Already borrowed").
        self._model_thread = model_thread or new_model_thread()
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moderation-tokenizer")
        self._counting_tokenizer = copy.deepcopy(classifier.tokenizer)
        self._jobs: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> None:
        """Start the batching task on the running loop."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="moderation-batcher")

    async def warm_up(self) -> None:
        """Work on the model thread before the service says it is ready: every weight read once
        (`page_in_weights`), every shape a half-precision CPU model can meet (`warm_up_shapes`),
        first-call costs, then a full forward pass at each length from the max
        length down to 8 tokens (halving), so that the first calls' one-off allocations happen now
        rather than under traffic; then, with `trim_heap`, what the passes freed goes back to the
        system, as after every served batch."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._model_thread, page_in_weights, self.classifier.model)
        longest_pack = max(min(self.max_batch_tokens, MAX_PACK_TOKENS), self.classifier.max_length)
        await loop.run_in_executor(self._model_thread, warm_up_shapes, self.classifier.model, longest_pack,
                                   self.classifier.max_length)
        for texts in [list(WARM_UP_TEXTS), *self._full_passes()]:
            # The tokenizer thread too: its first requests would otherwise grow the process after /ready.
            await loop.run_in_executor(self._tokenizer_thread, self._token_lengths, texts)
            await loop.run_in_executor(self._model_thread, score_texts, self.classifier, texts, self.max_batch_tokens)
        if self.trim_heap:  # /ready then reports the memory the service holds between batches
            await loop.run_in_executor(self._model_thread, trim_free_heap)

    def _full_passes(self) -> list[list[str]]:
        """Texts of (about) `length` tokens, as many as fill one forward pass, for each length; then
        texts of every one of those lengths together, which a CPU model scores as one packed row
        (`packing.py`), the shape of served batches there."""
        passes, length, mixed = [], min(self.classifier.max_length, self.max_batch_tokens), []
        while length >= 8:
            rows = min(MAX_BATCH_ROWS, self.max_batch_tokens // length)
            passes.append([" ".join(["moderation"] * (length - 1))] * rows)
            mixed.append(passes[-1][0])
            length //= 2
        return passes + [mixed]

    async def submit(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Moderation results for `texts`, in order, once the batch they join has been scored."""
        if self._task is None or self._task.done() or self._closing:
            raise ServiceUnavailable("the service is not accepting requests (starting or shutting down)")
        loop = asyncio.get_running_loop()
        texts = [normalise_prompt(text) for text in texts]
        lengths = await loop.run_in_executor(self._tokenizer_thread, self._token_lengths, texts)
        job = _Job(texts, lengths, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._arrivals += 1
        self.metrics.queued.inc()
        self._arrived.set()
        try:
            probabilities = await job.future
        finally:
            self.metrics.queued.dec()
        return [moderation_result(self.classifier.verdict(row)) for row in probabilities]

    def _token_lengths(self, texts: list[str]) -> list[int]:
        scored = [text for text in texts if text.strip()]
        counted = iter(encode_prompts(self._counting_tokenizer, scored, self.classifier.max_length,
                                      self.classifier.prompt_template) if scored else [])
        return [len(next(counted)) if text.strip() else 0 for text in texts]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        answered, arrivals_then, return_deadline = 0, 0, 0.0
        while True:
            while not self._jobs:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            # The clients the last batch answered send their next requests within milliseconds; waiting
            # for them (a bounded share of that batch's time) gives N clients one batch of N instead of
            # two halves taking turns on the model.
            while (self._arrivals - arrivals_then < answered and not self._closing and not self._full(self._jobs)
                   and return_deadline > loop.time()):
                await self._next_arrival(return_deadline)
            batch = self._gather_waiting([self._jobs.popleft()])
            deadline = batch[0].enqueued + self.max_wait
            # Wait for company until the deadline, unless the batch is full or the next request does not fit.
            while not self._jobs and not self._full(batch) and not self._closing and deadline > loop.time():
                await self._next_arrival(deadline)
                batch = self._gather_waiting(batch)
            started = loop.time()
            await self._score(batch)
            answered, arrivals_then = len(batch), self._arrivals
            finished = loop.time()
            return_deadline = finished + self.return_wait_share * (finished - started)

    async def _next_arrival(self, deadline: float) -> None:
        """Until a request arrives, or at the latest until the loop's clock reads `deadline`."""
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            pass

    def _gather_waiting(self, batch: list[_Job]) -> list[_Job]:
        """Move waiting requests into `batch` in arrival order while they fit the budget."""
        while self._jobs and self._fits(batch, self._jobs[0]):
            batch.append(self._jobs.popleft())
        return batch

    def _fits(self, batch: list[_Job], job: _Job) -> bool:
        rows = sum(len(j.texts) for j in batch) + len(job.texts)
        tokens = sum(sum(j.lengths) for j in batch) + sum(job.lengths)
        return rows <= MAX_BATCH_ROWS and tokens <= self.max_gather_tokens

    def _full(self, batch: Iterable[_Job]) -> bool:
        return (sum(len(j.texts) for j in batch) >= MAX_BATCH_ROWS
                or sum(sum(j.lengths) for j in batch) >= self.max_gather_tokens)

    async def _score(self, batch: list[_Job]) -> None:
        texts = [text for job in batch for text in job.texts]
        started = time.perf_counter()
        try:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, score_texts, self.classifier, texts, self.max_batch_tokens
            )
            if probabilities.shape != (len(texts), 1 + len(self.classifier.category_codes)):
                raise RuntimeError(f"the classifier returned {probabilities.shape} scores for {len(texts)} texts")
        except Exception as error:  # one bad batch must not stop the service
            self.metrics.batch_failures.inc()
            logger.exception("scoring a batch of %d text(s) from %d request(s) failed", len(texts), len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        finally:
            self.batches += 1
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_texts.observe(len(texts))
            self.metrics.batch_requests.observe(len(batch))
        self.metrics.inputs.inc(len(texts))
        offset = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(probabilities[offset:offset + len(job.texts)])
            offset += len(job.texts)
        if self.trim_heap:  # answered first; the next batch waits for the model thread anyway
            await asyncio.get_running_loop().run_in_executor(self._model_thread, trim_free_heap)

    async def close(self) -> None:
        """Stop taking requests, score every request already queued, then stop the threads."""
        self._closing = True
        if self._task is not None:
            self._arrived.set()
            await self._task
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------- HTTP API


class ApiError(Exception):
    """An error answered in the OpenAI error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def parse_moderation_request(body: bytes, max_inputs: int) -> list[str]:
    """The texts of an OpenAI moderation request body, or the ApiError (400, 413, 422) saying what is wrong."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(422, f"the request body must be a JSON object, not {_json_type(payload)}", code="invalid_type")
    if "input" not in payload:
        raise ApiError(422, "'input' is required: a string or an array of strings", param="input", code="missing_input")
    if "model" in payload and payload["model"] is not None and not isinstance(payload["model"], str):
        raise ApiError(422, f"'model' must be a string, not {_json_type(payload['model'])}", param="model",
                       code="invalid_type")
    items = payload["input"]
    if isinstance(items, str):
        return [items]
    if not isinstance(items, list):
        raise ApiError(422, f"'input' must be a string or an array of strings, not {_json_type(items)}",
                       param="input", code="invalid_type")
    if not items:
        raise ApiError(422, "'input' is an empty array: give at least one text", param="input", code="empty_input")
    if len(items) > max_inputs:
        raise ApiError(413, f"'input' has {len(items)} texts; at most {max_inputs} are accepted in one request",
                       param="input", code="too_many_inputs")
    texts = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            item = item["text"]  # the multi-modal form's text part: {"type": "text", "text": "..."}
        if not isinstance(item, str):
            kind = f"an {item.get('type')!r} part" if isinstance(item, dict) and "type" in item else _json_type(item)
            raise ApiError(422, f"'input[{index}]' must be a string (text only), not {kind}", param=f"input[{index}]",
                           code="invalid_type")
        texts.append(item)
    return texts


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed the limit."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise too_large
    return bytes(body)


def create_app(args: ServeArguments, load: Callable[[], Classifier] | None = None,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI application. `load` builds the classifier (default: `load_classifier` with the
    arguments); it runs on the model thread after the server starts listening, so /health answers
    while the model loads and /ready turns 200 only after a warm-up pass."""
    metrics = ServiceMetrics()
    state: dict[str, Any] = {"batcher": None, "ready": False, "draining": False, "failed": None, "served": 0}
    model_name = args.model_name or Path(args.model_dir).resolve().name

    def default_load() -> Classifier:
        from .inference import load_classifier

        classifier = load_classifier(args.model_dir, device=args.device, dtype=args.dtype, base_model=args.base_model,
                                     trust_remote_code=args.trust_remote_code)
        return classifier

    async def bring_up() -> None:
        started = time.perf_counter()
        model_thread = new_model_thread()
        try:
            classifier = await asyncio.get_running_loop().run_in_executor(model_thread, load or default_load)
            if args.threshold is not None:
                classifier.threshold = args.threshold
            batcher = Batcher(classifier, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                              max_gather_tokens=args.max_gather_tokens, metrics=metrics, trim_heap=args.trim_heap,
                              model_thread=model_thread, return_wait_share=args.return_wait_share)
            await batcher.start()
            state["batcher"] = batcher
            await batcher.warm_up()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - reported, then the server is stopped
            state["failed"] = error
            if state["batcher"] is None:
                model_thread.shutdown(wait=False, cancel_futures=True)
            message = str(error) if isinstance(error, SafetyClassifierError) else repr(error)
            logger.error("cannot serve %s: %s", args.model_dir, message)
            if on_load_failure is not None:
                on_load_failure(error)
            return
        state["ready"] = True
        metrics.ready.set(1)
        device = next(classifier.model.parameters()).device
        logger.info("ready: %s on http://%s:%d (%s, %s, threshold %.4f, categories %s), loaded and warmed up in %.1f s",
                    model_name, args.host, args.port, device, dtype_name(classifier.model), classifier.threshold,
                    ",".join(batcher.names), time.perf_counter() - started)

    @asynccontextmanager
    async def lifespan(app):
        bringing_up = asyncio.create_task(bring_up(), name="moderation-load")
        yield
        state["draining"] = True
        metrics.ready.set(0)
        if not bringing_up.done():
            bringing_up.cancel()
        if state["batcher"] is not None:
            await state["batcher"].close()
        if state["failed"] is None:
            logger.info("stopped: %d moderation request(s) answered, queue drained", state["served"])

    app = FastAPI(title="safety-classifier moderation", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = state
    app.state.metrics = metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=code).response()

    @app.get("/health")
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: the model is loaded and warmed up, and the service is not draining."""
        if state["ready"] and not state["draining"]:
            return {"status": "ready", "model": model_name}
        status = "draining" if state["draining"] else ("failed" if state["failed"] else "loading")
        return JSONResponse({"status": status, "model": model_name}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        """OpenAI moderation: {"input": str | [str], "model"?} -> {"id", "model", "results"}."""
        started = time.perf_counter()
        try:
            texts = parse_moderation_request(await read_body(request, args.max_body_bytes), args.max_inputs)
            batcher = state["batcher"]
            if not state["ready"] or batcher is None:
                raise ApiError(503, "the model is not loaded yet; retry when GET /ready answers 200",
                               code="model_not_ready", error_type="service_unavailable")
            try:
                results = await batcher.submit(texts)
            except ServiceUnavailable as error:
                raise ApiError(503, str(error), code="shutting_down", error_type="service_unavailable") from None
            except Exception:  # noqa: BLE001 - already logged with its traceback by the batcher
                raise ApiError(500, "the model failed on the batch this request was in; retry it",
                               code="model_error") from None
            response = JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": model_name, "results": results})
        except ApiError as error:
            response = error.response()
        except Exception:  # never let one request take the service down
            logger.exception("unexpected error answering POST /v1/moderations")
            response = ApiError(500, "internal error", code="internal_error").response()
        state["served"] += 1
        metrics.requests.labels(code=str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    return app


# --------------------------------------------------------------------------------------------- entry point


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at `count`; True if applied.

    glibc gives threads that allocate at once arenas of their own (up to 8 per core), and memory
    freed in one arena is not reused by the others: with the event loop, the tokenizer thread and
    the model thread each allocating, the process kept growing under traffic (RSS +6.9 % over
    1,000 requests after `/ready` in three load tests; with 2 arenas it stayed flat: README,
    *Under load*). Must run before those threads allocate.
    """
    if count <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _glibc()
    return bool(libc.mallopt(M_ARENA_MAX, count)) if libc is not None else False


def trim_free_heap() -> bool:
    """Give the free pages inside glibc's heaps back to the system (`malloc_trim(0)`); True if any were.

    A forward pass frees its activations, but glibc keeps the freed memory in its heaps for reuse,
    and with each new mix of batch shapes the heaps grow a little more: the process kept growing
    by 5-8 % over the first 1,000 requests after `/ready` (most of that was the model file paging
    in: `page_in_weights`). Trimming after each batch returns what the batch freed (the service
    holds ~300 MiB less under traffic: README, *Under load*); it costs a walk over the free lists."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def page_in_weights(model: Any) -> int:
    """Read every CPU weight and buffer of `model` once; the bytes read.

    `from_pretrained` memory-maps safetensors weights, and a page of the file joins the process
    only when read. A forward pass reads every matrix, but of the embedding only the rows of the
    tokens it sees: the warm-up's texts page in a few rows, and traffic the rest of SmolLM2's
    49,152 x 576 table a page at a time. That was all of the service's growth after `/ready`
    (+10 % in 240 batches of ToxicChat prompts, every MiB of it the model file's mapping: README,
    *Under load*). Reading the whole model first makes `/ready` the size the service keeps."""
    import torch

    read = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.sum()
                read += tensor.numel() * tensor.element_size()
    return read


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (musl has neither mallopt's arenas nor malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _configure_logging(level: str) -> None:
    """One line per startup and shutdown, and errors: no access log, no library chatter."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").disabled = True
    quiet_library_noise()  # what the scripts silence (load report of a new head, kernel notes, progress bars)
    # A service's log is read by operators: the libraries' deprecation notes are for developers.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("transformers", "peft", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    transformers_logging.set_verbosity_error()


def serve(args: ServeArguments) -> int:
    """Run the service until SIGTERM/SIGINT: 0 after a graceful stop, 1 if the model could not be served."""
    import uvicorn

    from .artifacts import read_metadata

    try:
        read_metadata(args.model_dir)  # an unusable directory fails now, before the server starts
    except SafetyClassifierError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    if args.malloc_arenas < 0:
        print("error: --malloc-arenas must be 0 (glibc's default) or more", file=sys.stderr)
        return 2
    limit_malloc_arenas(args.malloc_arenas)
    server: uvicorn.Server | None = None

    def stop_on_failure(_: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(args, on_load_failure=stop_on_failure)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="on", access_log=False, log_config=None,
                            log_level="warning", timeout_graceful_shutdown=args.graceful_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it has drained; a handler here makes a
    # SIGTERM stop an ordinary exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        return 130
    return 1 if app.state.service["failed"] is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`serve.py` / `safety-classifier-serve`: parse `ServeArguments`, serve."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ServeArguments, description="Serve a safety classifier as an OpenAI-compatible "
                                                          "moderation endpoint (POST /v1/moderations).")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return serve(args)

