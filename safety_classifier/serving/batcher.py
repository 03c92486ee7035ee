"""Dynamic batching: concurrent requests gathered into batches scored on one model thread."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..batching import MAX_BATCH_ROWS, MAX_PACK_TOKENS, default_batch_tokens
from ..errors import SafetyClassifierError
from ..formatting import ModerationInput, encode_prompts, is_blank, judged_part, normalise_input
from ..inference import Classifier
from ..packing import scores_in_stepped_packs, warm_up_shapes
from .conversation import Conversation, resolve_inputs
from .memory import page_in_weights, trim_free_heap
from .metrics import ServiceMetrics
from .protocol import BINARY_CATEGORY, ModerationResult

logger = logging.getLogger("safety_classifier.serving")

GATHERED_FORWARD_PASSES = 4  # default real-token budget of a gathered batch, in forward passes' budgets
WARM_UP_TEXTS = ("What is the capital of France?", "Tell me how to shoplift from a supermarket without being seen.")


def new_model_thread() -> ThreadPoolExecutor:
    """The one thread that loads the model and runs all its work. PyTorch's OpenMP threads are per
    calling thread: torch work on a second thread (loading included) adds a second team, and with
    more OpenMP threads than cores libgomp stops spinning between parallel regions, for every team,
    which slows every forward pass."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="moderation-model")


def score_texts(classifier: Classifier, texts: Sequence[ModerationInput], max_batch_tokens: int | None) -> np.ndarray:
    """`Classifier.scores` (P(unsafe), then the categories' scores), so that whatever the
    classifier applies (its calibration, the empty-prompt rule) applies here too.

    A half-precision CPU model scores packs only: their lengths come in steps of
    `PACK_TOKEN_MULTIPLE`, all met in the warm-up, so traffic brings no new matrix shape and the
    service's memory stays flat (padded batches have a shape per row count and length)."""
    pack = True if scores_in_stepped_packs(classifier.model) else None
    scores = classifier.scores(texts, max_batch_tokens=max_batch_tokens, show_progress=False, pack=pack)
    return np.asarray(scores, dtype=np.float64)


def describe(error: BaseException) -> str:
    """An error as a client reads it: the toolkit's own messages as they are, others with their type."""
    return str(error) if isinstance(error, SafetyClassifierError) else f"{type(error).__name__}: {error}"


class ServiceUnavailable(Exception):
    """The batcher is not running (not started yet, or draining for shutdown)."""


class UnreadableInput(SafetyClassifierError, ValueError):
    """An input this classifier cannot read: preparing it (a conversation fitted to the max length,
    encoding in the classifier's templates, tokenization) failed, as it does alone: an answer where
    no response template fits, a text the tokenizer refuses. The client's to fix, not the model's;
    `index` is its place in the submitted inputs."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class _Job:
    texts: list[ModerationInput]
    lengths: list[int]
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Gathers concurrent requests into batches scored on one model thread.

    Requests wait in a deque; the batching task takes the oldest, then every request that is
    already waiting or arrives until `max_wait_ms` after the oldest arrived, while their real
    tokens stay within `max_gather_tokens` (and their texts within `MAX_BATCH_ROWS`). One
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

    async def submit(self, texts: Sequence[str | ModerationInput | Conversation]) -> list[ModerationResult]:
        """Moderation results for `texts` (prompts, `PromptResponse` pairs, or conversations, each
        judged as `conversation.fitted_input` says), in order, once the batch they join has been scored."""
        if self._task is None or self._task.done() or self._closing:
            raise ServiceUnavailable("the service is not accepting requests (starting or shutting down)")
        loop = asyncio.get_running_loop()
        texts, lengths = await loop.run_in_executor(self._tokenizer_thread, self._prepare, texts)
        job = _Job(texts, lengths, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._arrivals += 1
        self.metrics.queued.inc()
        self._arrived.set()
        try:
            probabilities = await job.future
        finally:
            self.metrics.queued.dec()
        return [ModerationResult.from_verdict(self.classifier.verdict(row, judged), judged)
                for judged, row in zip(map(judged_part, texts), probabilities)]

    def _prepare(self, values: Sequence[object]) -> tuple[list[ModerationInput], list[int]]:
        """On the tokenizer thread: each input normalised (a conversation first resolved to the input
        it is judged as), and its length in tokens. A failure is the first input that fails alone,
        as `UnreadableInput`, before anything reaches the model; one no input explains is re-raised."""
        try:
            return self._prepared(values)
        except Exception as error:
            unreadable = self._unreadable(values)
            if unreadable is None:
                logger.exception("preparing a request of %d input(s) failed, though each alone is read",
                                 len(values))
                raise
            raise unreadable from error

    def _prepared(self, values: Sequence[object]) -> tuple[list[ModerationInput], list[int]]:
        texts = [normalise_input(value) for value in resolve_inputs(
            values, self._counting_tokenizer, self.classifier.max_length, self.classifier.prompt_template)]
        return texts, self._token_lengths(texts)

    def _unreadable(self, values: Sequence[object]) -> UnreadableInput | None:
        """The first of `values` whose preparation fails alone, with its error (None: none does)."""
        for index, value in enumerate(values):
            try:
                self._prepared([value])
            except Exception as error:  # noqa: BLE001 - whatever it is, this input causes it
                return UnreadableInput(describe(error), index)
        return None

    def _token_lengths(self, texts: list[ModerationInput]) -> list[int]:
        scored = [text for text in texts if not is_blank(text)]
        counted = iter(encode_prompts(self._counting_tokenizer, scored, self.classifier.max_length,
                                      self.classifier.prompt_template) if scored else [])
        return [0 if is_blank(text) else len(next(counted)) for text in texts]

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
