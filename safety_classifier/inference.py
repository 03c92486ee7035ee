"""Scoring prompts with a classifier: length-sorted, token-budgeted batches in inference mode."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .artifacts import METADATA_FILE, load_classifier_model, read_metadata
from .calibration import IDENTITY, Calibration
from .categories import (
    category_route_threshold_of,
    category_score_rule_of,
    flagged_categories,
    reported_category_scores,
    unsafe_verdicts,
)
from .errors import ModelLoadError
from .formatting import encode_prompts, normalise_prompt
from .labels import LabelSchema, split_logits
from .modeling import ID2LABEL, default_device
from .packing import (
    MAX_PACK_TOKENS,
    PACKED_TOKEN_COST,
    enable_packed_scoring,
    pack_rows,
    packed_forward,
    uses_packed_attention,
)

EMPTY_PROMPT_PROBABILITY = 0.0
"""Empty and whitespace-only prompts have nothing to moderate: they score 0.0 (safe) without a forward pass."""
EMPTY_PROMPT_MARGIN = float("-inf")
"""Their logit margin: P(unsafe) 0.0 under any calibration (`Calibration.probabilities` keeps -inf at 0.0)."""


def default_batch_tokens(device: torch.device) -> int:
    """Scoring batch budget: small on CPU (measured fastest on 2 cores), large on GPU."""
    return 16384 if device.type == "cuda" else 2048


def token_budget_batches(lengths: np.ndarray, max_batch_tokens: int, max_batch_rows: int = 256) -> list[np.ndarray]:
    """Group row indices longest first so that rows x longest row stays within the budget.

    Rows of similar length share a batch, so almost no compute goes to padding; a row longer
    than the budget gets a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, current, longest = [], [], 0
    for index in order:
        longest_if_added = max(longest, int(lengths[index]))
        if current and (longest_if_added * (len(current) + 1) > max_batch_tokens or len(current) >= max_batch_rows):
            batches.append(np.asarray(current))
            current, longest_if_added = [], int(lengths[index])
        current.append(index)
        longest = longest_if_added
    if current:
        batches.append(np.asarray(current))
    return batches


PASS_OVERHEAD_SHARE = 1 / 32
"""A forward pass costs about as much as this share of the budget in padded tokens besides its own
tokens (the weights are read once per pass); a rough estimate from timing single passes of 8 to
512 tokens on 2 CPU cores."""
GPU_PASS_OVERHEAD_SHARE = 0.6
"""The same on a GPU, where an eager forward pass is mostly its fixed cost (most likely launching each layer's
kernels from Python): Phi-4-mini on an H100 took 85-100 ms a pass whether it held ~450 or ~2,300
tokens, a fixed part worth roughly 14,000 tokens' compute; 0.6 of the 16,384-token budget is a
rough estimate of that order (README, *Serving*, on a GPU)."""


CPU = torch.device("cpu")


def pass_overhead_tokens(device: torch.device, max_batch_tokens: int) -> float:
    """What one more forward pass costs on `device`, in padded tokens of a `max_batch_tokens` budget."""
    return max_batch_tokens * (GPU_PASS_OVERHEAD_SHARE if device.type == "cuda" else PASS_OVERHEAD_SHARE)


def scoring_batches(lengths: np.ndarray, max_batch_tokens: int, max_batch_rows: int = 256,
                    overhead_tokens: float | None = None) -> list[np.ndarray]:
    """Row indices grouped for scoring: the cheapest split of the length-sorted rows into batches.

    Cost = padded tokens (rows x longest row) + `overhead_tokens` per forward pass (default: a CPU's
    `pass_overhead_tokens`), each batch within the budget (a longer row alone). Unlike the greedy
    fill of `token_budget_batches`, a few texts of mixed lengths (what a server gathers) are not
    padded to their longest: 500 + 3 x 30 tokens cost two passes, not 4 x 500. Batches of
    neighbours in length order are optimal for this cost, so a dynamic programme over split points
    finds the cheapest in O(rows x max_batch_rows).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    overhead = pass_overhead_tokens(CPU, max_batch_tokens) if overhead_tokens is None else overhead_tokens
    order = np.argsort(-lengths, kind="stable")
    longest_first = lengths[order]
    count = len(order)
    cost = np.zeros(count + 1)
    start_of_last = np.zeros(count + 1, dtype=np.int64)
    for end in range(1, count + 1):
        # Batch = rows start..end-1; its longest is the row at `start` (sorted longest first).
        starts = np.arange(max(0, end - max_batch_rows), end)
        padded = (end - starts) * longest_first[starts]
        within = (padded <= max_batch_tokens) | (starts == end - 1)
        totals = np.where(within, cost[starts] + overhead + padded, np.inf)
        best = int(np.argmin(totals))
        cost[end], start_of_last[end] = totals[best], starts[best]
    batches, end = [], count
    while end:
        batches.append(order[start_of_last[end]:end])
        end = int(start_of_last[end])
    return batches[::-1]


def pad_rows(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[Sequence[int]],
             rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The rows' token ids, right-padded to the longest, with their attention mask."""
    return tokenizer.pad({"input_ids": [input_ids[i] for i in rows]}, return_tensors="pt")


def device_scoring_batches(lengths: np.ndarray, max_batch_tokens: int, device: torch.device) -> list[np.ndarray]:
    """`scoring_batches` priced for `device`: each pass costs what `pass_overhead_tokens` says it does there."""
    return scoring_batches(lengths, max_batch_tokens, overhead_tokens=pass_overhead_tokens(device, max_batch_tokens))


def padded_batches(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[Sequence[int]],
                   max_batch_tokens: int, device: torch.device) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """`device_scoring_batches` of tokenized rows: (row indices, right-padded input_ids and attention_mask)."""
    lengths = np.asarray([len(ids) for ids in input_ids])
    for batch in device_scoring_batches(lengths, max_batch_tokens, device):
        yield batch, pad_rows(tokenizer, input_ids, batch)


def scoring_plan(lengths: np.ndarray, max_batch_tokens: int, pack: bool | None = None,
                 overhead_tokens: float | None = None) -> tuple[bool, list[np.ndarray]]:
    """(packed, row groups): padded batches (`scoring_batches`) or packs (`packing.pack_rows`);
    with `pack=None`, whichever costs less.

    Cost, as in `scoring_batches`: padded tokens plus a pass overhead per forward pass; a packed
    token costs `PACKED_TOKEN_COST` padded ones (its attention runs span by span, and its
    element-wise work on a longer row leaves the cache). Thousands of prompts sorted by length
    (a file) pad little and stay padded; a few prompts of mixed lengths (a served batch) pack.
    """
    overhead = pass_overhead_tokens(CPU, max_batch_tokens) if overhead_tokens is None else overhead_tokens
    batches = None if pack else scoring_batches(lengths, max_batch_tokens, overhead_tokens=overhead)
    packs = None if pack is False else pack_rows(lengths, min(max_batch_tokens, MAX_PACK_TOKENS))
    if pack is None:
        padded_cost = sum(len(batch) * int(lengths[batch].max()) for batch in batches) + overhead * len(batches)
        pack = PACKED_TOKEN_COST * int(lengths.sum()) + overhead * len(packs) < padded_cost
    return (True, packs) if pack else (False, batches)


def predict_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[object],
    *,
    max_length: int,
    max_batch_tokens: int | None = None,
    show_progress: bool = True,
    description: str = "scoring",
    pack: bool | None = None,
    prompt_template: str | None = None,
) -> np.ndarray:
    """(texts x outputs) logits, in the order of `texts` whatever order batches ran in; the rows of
    empty prompts are NaN (they get no forward pass). Texts are encoded in `prompt_template`
    (`formatting.py`; None: as they are).

    The one batched forward pass behind every score: scoring, calibration, baselines' inputs. A
    model switched to packed attention (`packing.enable_packed_scoring`, done by `load_classifier`
    on CPU) scores packed rows where that is cheaper (`scoring_plan`), or as `pack` says; any
    other model, padded batches.
    """
    packable = uses_packed_attention(model)
    if pack and not packable:
        raise ValueError("pack=True needs a model switched to packed attention (packing.enable_packed_scoring)")
    prompts = [normalise_prompt(text) for text in texts]
    scored = np.asarray([i for i, prompt in enumerate(prompts) if prompt.strip()], dtype=np.int64)
    if not len(scored):
        return np.full((len(prompts), int(getattr(model.config, "num_labels", 2))), np.nan)
    input_ids = encode_prompts(tokenizer, [prompts[i] for i in scored], max_length, prompt_template)
    device = next(model.parameters()).device
    max_batch_tokens = max_batch_tokens or default_batch_tokens(device)
    packed, groups = scoring_plan(np.asarray([len(ids) for ids in input_ids]), max_batch_tokens,
                                  pack if packable else False, pass_overhead_tokens(device, max_batch_tokens))

    def padded_forward() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for batch in groups:
            padded = pad_rows(tokenizer, input_ids, batch)
            yield batch, model(input_ids=padded["input_ids"].to(device),
                               attention_mask=padded["attention_mask"].to(device)).logits

    batches = packed_forward(model, input_ids, groups) if packed else padded_forward()
    logits = None
    model.eval()
    with torch.inference_mode(), tqdm(total=len(scored), desc=description, unit="prompt", disable=not show_progress) as bar:
        for batch, batch_logits in batches:
            batch_logits = batch_logits.double().cpu().numpy()
            if logits is None:
                logits = np.full((len(prompts), batch_logits.shape[1]), np.nan)
            logits[scored[batch]] = batch_logits
            bar.update(len(batch))
    return logits


def margins_of(logits: np.ndarray) -> np.ndarray:
    """logit(unsafe) - logit(safe) per row; empty prompts (NaN rows) get -inf, P(unsafe) 0.0."""
    margins, _ = split_logits(logits)
    return np.where(np.isnan(margins), EMPTY_PROMPT_MARGIN, margins)


def category_scores_of(logits: np.ndarray) -> np.ndarray:
    """sigmoid of each category output; empty prompts score 0.0 in every category."""
    _, category_logits = split_logits(logits)
    return np.nan_to_num(expit(category_logits), nan=EMPTY_PROMPT_PROBABILITY)


def predict_logit_margins(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[object],
    *,
    max_length: int,
    max_batch_tokens: int | None = None,
    show_progress: bool = True,
    description: str = "scoring",
    prompt_template: str | None = None,
) -> np.ndarray:
    """logit(unsafe) - logit(safe) for each text: sigmoid(margin) is softmax[:, 1], and a
    `Calibration` maps margins to calibrated P(unsafe). Empty prompts get -inf (P(unsafe) 0.0)."""
    return margins_of(predict_logits(
        model, tokenizer, texts, max_length=max_length, max_batch_tokens=max_batch_tokens,
        show_progress=show_progress, description=description, prompt_template=prompt_template,
    ))


def predict_unsafe_probabilities(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[object],
    *,
    max_length: int,
    max_batch_tokens: int | None = None,
    show_progress: bool = True,
    description: str = "scoring",
    calibration: Calibration = IDENTITY,
    prompt_template: str | None = None,
) -> np.ndarray:
    """P(unsafe) for each text: `calibration` of the logit margins (by default none: softmax[:, 1])."""
    return calibration.probabilities(predict_logit_margins(
        model, tokenizer, texts, max_length=max_length, max_batch_tokens=max_batch_tokens,
        show_progress=show_progress, description=description, prompt_template=prompt_template,
    ))


@dataclass
class Classifier:
    """A loaded classifier: model, tokenizer, the decision threshold and the calibration chosen on
    validation; with a category head, each category's threshold too (`metadata["categories"]`)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    threshold: float
    max_length: int
    metadata: dict = field(default_factory=dict)
    calibration: Calibration | None = None
    """None: the one stored in `metadata` (identity if none is), so a Classifier built from a
    directory's metadata never scores uncalibrated against a threshold chosen on calibrated scores."""

    def __post_init__(self) -> None:
        if self.calibration is None:
            self.calibration = Calibration.from_metadata(self.metadata)
        self.schema = LabelSchema.from_metadata(self.metadata)
        self.category_score_rule = category_score_rule_of(self.metadata)
        self.category_thresholds = np.asarray(
            [float(entry.get("threshold", 0.5)) for entry in self.metadata.get("categories") or []], dtype=np.float64)
        # A text is also unsafe when its largest category score reaches this (None: no route).
        self.category_route_threshold = category_route_threshold_of(self.metadata)

    @property
    def prompt_template(self) -> str | None:
        """The template texts are read in (`formatting.py`); None: as they are."""
        return self.metadata.get("prompt_template")

    @property
    def category_codes(self) -> list[str]:
        """The categories this classifier names (S1, S2, ...); none for a binary one."""
        return self.schema.codes

    def logits(self, texts: Sequence[object], *, max_batch_tokens: int | None = None,
               show_progress: bool = True, description: str = "scoring", pack: bool | None = None) -> np.ndarray:
        return predict_logits(
            self.model, self.tokenizer, texts, max_length=self.max_length,
            max_batch_tokens=max_batch_tokens, show_progress=show_progress, description=description, pack=pack,
            prompt_template=self.prompt_template,
        )

    def logit_margins(self, texts: Sequence[object], **kwargs) -> np.ndarray:
        """Uncalibrated scores: logit(unsafe) - logit(safe) per text."""
        return margins_of(self.logits(texts, **kwargs))

    def unsafe_probabilities(self, texts: Sequence[object], **kwargs) -> np.ndarray:
        """Calibrated P(unsafe) per text; the stored threshold applies to these."""
        return self.calibration.probabilities(self.logit_margins(texts, **kwargs))

    def scores(self, texts: Sequence[object], **kwargs) -> np.ndarray:
        """(texts x (1 + categories)): calibrated P(unsafe), then each category's score, from one pass."""
        logits = self.logits(texts, **kwargs)
        unsafe = self.calibration.probabilities(margins_of(logits))
        if not self.schema.has_categories:
            return unsafe[:, None]
        categories = reported_category_scores(category_scores_of(logits), unsafe, self.category_score_rule)
        return np.concatenate([unsafe[:, None], categories], axis=1)

    def unsafe(self, scores: np.ndarray) -> np.ndarray:
        """The verdict per row of `scores`: P(unsafe) at or over the threshold, or, where the
        classifier stores a category route, its largest category score at or over the route's."""
        scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
        return unsafe_verdicts(scores[:, 0], scores[:, 1:], self.threshold, self.category_route_threshold)

    def verdict(self, row: Sequence[float]) -> dict:
        """The answer for one row of `scores`: label and P(unsafe); with a category head, `categories`
        (a category is flagged when the prompt is unsafe and its score reaches the category's own
        threshold, so a safe verdict never names a harm; a text the category route made unsafe
        names the category that did) and `category_scores`, the OpenAI moderation API's field names."""
        unsafe_probability = float(row[0])
        unsafe = bool(self.unsafe(np.asarray([row]))[0])
        result = {"label": ID2LABEL[int(unsafe)], "unsafe_probability": unsafe_probability}
        if self.schema.has_categories:
            category_scores = np.asarray(row[1:], dtype=np.float64)
            flagged = flagged_categories(np.asarray([unsafe_probability]), category_scores[None, :],
                                         self.threshold, self.category_thresholds, self.category_route_threshold)[0]
            result["categories"] = {code: bool(on) for code, on in zip(self.category_codes, flagged)}
            result["category_scores"] = {code: float(score) for code, score in zip(self.category_codes, category_scores)}
        return result

    def classify(self, texts: Sequence[object], **kwargs) -> Iterable[dict]:
        for text, row in zip(texts, self.scores(texts, **kwargs)):
            yield {"text": normalise_prompt(text), **self.verdict(row)}


def load_classifier(
    model_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    base_model: str | None = None,
    trust_remote_code: bool = False,
    merge_adapters: bool = True,
    pack_prompts: bool = True,
) -> Classifier:
    """Load a directory written by a train_*.py script (refused unless complete).

    Its stored calibration applies to every score; a directory saved before calibration existed
    has none and scores as it always did (softmax[:, 1]). LoRA adapters are merged into the base
    weights (not on an NF4 backbone) unless `merge_adapters=False`. On CPU, prompts are scored
    packed (`packing.py`) where the model supports it, unless `pack_prompts=False`.
    """
    metadata = read_metadata(model_dir)
    calibration = Calibration.from_metadata(metadata)
    if metadata["threshold"] is None:
        raise ModelLoadError(f"{model_dir}: {METADATA_FILE} holds no decision threshold")
    device = torch.device(device) if device is not None else default_device()
    model, tokenizer = load_classifier_model(
        model_dir, metadata, device=device, dtype=dtype, base_model=base_model, trust_remote_code=trust_remote_code,
        merge_adapters=merge_adapters,
    )
    if pack_prompts:
        enable_packed_scoring(model, tokenizer)
    return Classifier(model, tokenizer, float(metadata["threshold"]), int(metadata["max_length"]), metadata, calibration)
