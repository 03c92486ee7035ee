"""Scoring prompts, and answers with the prompts they answer, with a classifier: batches planned
by `batching.py`, run in inference mode.

Every scoring function takes a mix of prompts (any value, read as text) and `PromptResponse` pairs
(`formatting.py`): a pair's verdict is about its response. An input whose judged text is empty or
white space (an empty prompt, or an empty answer) scores safe with probability 0.0 without a
forward pass.
"""

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
from .batching import default_batch_tokens, pad_rows, pass_overhead_tokens, scoring_plan
from .calibration import IDENTITY, Calibration
from .categories import (
    category_route_threshold_of,
    category_score_rule_of,
    flagged_categories,
    reported_category_scores,
    unsafe_verdicts,
)
from .errors import ModelLoadError
from .formatting import (
    ModerationInput,
    PromptResponse,
    encode_prompts,
    is_blank,
    normalise_input,
    response_template_for,
)
from .labels import LabelSchema, split_logits
from .modeling import ID2LABEL, default_device
from .packing import enable_packed_scoring, packed_forward, uses_packed_attention

EMPTY_PROMPT_PROBABILITY = 0.0
"""Empty and whitespace-only prompts (and answers) have nothing to moderate: they score 0.0 (safe)
without a forward pass."""
EMPTY_PROMPT_MARGIN = float("-inf")
"""Their logit margin: P(unsafe) 0.0 under any calibration (`Calibration.probabilities` keeps -inf at 0.0)."""


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
    blank inputs (`formatting.is_blank`: an empty prompt or answer) are NaN (they get no forward
    pass). Prompts are encoded in `prompt_template` (`formatting.py`; None: as they are), and
    `PromptResponse` pairs in the pair template that goes with it.

    The one batched forward pass behind every score: scoring, calibration, baselines' inputs. A
    model switched to packed attention (`packing.enable_packed_scoring`, done by `load_classifier`
    on CPU) scores packed rows where that is cheaper (`scoring_plan`), or as `pack` says; any
    other model, padded batches.
    """
    packable = uses_packed_attention(model)
    if pack and not packable:
        raise ValueError("pack=True needs a model switched to packed attention (packing.enable_packed_scoring)")
    inputs = [normalise_input(text) for text in texts]
    scored = np.asarray([i for i, value in enumerate(inputs) if not is_blank(value)], dtype=np.int64)
    if not len(scored):
        return np.full((len(inputs), int(getattr(model.config, "num_labels", 2))), np.nan)
    input_ids = encode_prompts(tokenizer, [inputs[i] for i in scored], max_length, prompt_template)
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
                logits = np.full((len(inputs), batch_logits.shape[1]), np.nan)
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
        stored = self.metadata.get("response_template")
        if stored is not None and stored != response_template_for(self.prompt_template):
            # Pairs are encoded in the template this toolkit writes; another would be read wrong.
            raise ModelLoadError(f"this classifier reads answers in the response template {stored!r}, not the "
                                 f"{response_template_for(self.prompt_template)!r} this toolkit encodes")
        # Answers get a threshold of their own where validation chose one (`evaluation.py`).
        response_threshold = self.metadata.get("response_threshold")
        self.response_threshold = None if response_threshold is None else float(response_threshold)

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

    def threshold_for(self, judged: str) -> float:
        """The decision threshold of a task: "response" (an answer) or "prompt"."""
        if judged == "response" and self.response_threshold is not None:
            return self.response_threshold
        return self.threshold

    def set_threshold(self, threshold: float) -> None:
        """One decision threshold for both tasks (`--threshold`)."""
        self.threshold = self.response_threshold = threshold

    def unsafe(self, scores: np.ndarray, judged: str = "prompt") -> np.ndarray:
        """The verdict per row of `scores`: P(unsafe) at or over the task's threshold, or, where the
        classifier stores a category route, its largest category score at or over the route's."""
        scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
        return unsafe_verdicts(scores[:, 0], scores[:, 1:], self.threshold_for(judged), self.category_route_threshold)

    def verdict(self, row: Sequence[float], judged: str = "prompt") -> dict:
        """The answer for one row of `scores`: label and P(unsafe); with a category head, `categories`
        (`categories.flagged_categories`: a safe verdict names no harm, an unsafe one each category at
        its own threshold, or else its top one) and `category_scores`, the OpenAI moderation API's
        field names."""
        unsafe_probability = float(row[0])
        unsafe = bool(self.unsafe(np.asarray([row]), judged)[0])
        result = {"label": ID2LABEL[int(unsafe)], "unsafe_probability": unsafe_probability}
        if self.schema.has_categories:
            category_scores = np.asarray(row[1:], dtype=np.float64)
            flagged = flagged_categories(np.asarray([unsafe_probability]), category_scores[None, :],
                                         self.threshold_for(judged), self.category_thresholds,
                                         self.category_route_threshold)[0]
            result["categories"] = {code: bool(on) for code, on in zip(self.category_codes, flagged)}
            result["category_scores"] = {code: float(score) for code, score in zip(self.category_codes, category_scores)}
        return result

    @property
    def judges_responses(self) -> bool:
        """Whether it was trained on answers with their prompts (`safety_classifier.json`'s `responses`);
        one that was not still scores a `PromptResponse`, but nothing measured how well."""
        return bool(self.metadata.get("responses"))

    def classify(self, texts: Sequence[object], **kwargs) -> Iterable[dict]:
        """One verdict per input, saying which text it judged: `{"text": prompt, "judged": "prompt", ...}`,
        or for a `PromptResponse` `{"text": prompt, "response": response, "judged": "response", ...}`."""
        inputs = [normalise_input(text) for text in texts]
        for value, row in zip(inputs, self.scores(inputs, **kwargs)):
            described = described_input(value)
            yield {**described, **self.verdict(row, described["judged"])}


def described_input(value: ModerationInput) -> dict:
    """The fields of a verdict that say what was judged: the text, the response of a pair, and which."""
    if isinstance(value, PromptResponse):
        return {"text": value.prompt, "response": value.response, "judged": "response"}
    return {"text": value, "judged": "prompt"}


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
