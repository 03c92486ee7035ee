"""The baselines a user would try before fine-tuning, scored like the fine-tuned classifiers.

* `fit_tfidf_logistic_regression`: word (1-2) + character (2-5, within word boundaries) n-gram
  TF-IDF and a class-balanced logistic regression (scikit-learn).
* `frozen_features` + `fit_logistic_probe`: the frozen backbone's hidden state at the last real
  token (the state the classification head reads), standardised, and a class-balanced
  logistic regression on it.

The regularisation strength C is chosen on the validation split by AUPRC, like the fine-tuned
rows choose their checkpoint; the test split is never looked at here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline, make_union
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .batching import default_batch_tokens, padded_batches
from .formatting import encode_prompts

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def _best_on_validation(make_model, train_x, train_y: np.ndarray, validation_x, validation_y: np.ndarray,
                        grid: Sequence[float] = C_GRID) -> tuple[Pipeline, float]:
    """Fit one model per C; keep the one with the highest validation AUPRC."""
    best, best_c, best_auprc = None, None, -1.0
    for c in grid:
        model = make_model(c).fit(train_x, train_y)
        auprc = average_precision_score(validation_y, model.predict_proba(validation_x)[:, 1])
        if auprc > best_auprc:
            best, best_c, best_auprc = model, c, auprc
    return best, best_c


def _balanced_logistic_regression(c: float) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight="balanced", max_iter=5000)


def tfidf_ngram_features() -> FeatureUnion:
    """Word (1-2) and character (2-5, within word boundaries) n-gram TF-IDF, unfitted."""
    return make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
    )


def fit_tfidf_logistic_regression(train_texts: Sequence[str], train_labels: np.ndarray,
                                  validation_texts: Sequence[str], validation_labels: np.ndarray) -> tuple[Pipeline, float]:
    """(fitted pipeline whose predict_proba takes raw texts, chosen C)."""

    def make(c: float) -> Pipeline:
        return make_pipeline(tfidf_ngram_features(), _balanced_logistic_regression(c))

    return _best_on_validation(make, list(train_texts), train_labels, list(validation_texts), validation_labels)


def fit_logistic_probe(train_features: np.ndarray, train_labels: np.ndarray,
                       validation_features: np.ndarray, validation_labels: np.ndarray) -> tuple[Pipeline, float]:
    """(fitted standardise + logistic regression pipeline on frozen features, chosen C)."""
    make = lambda c: make_pipeline(StandardScaler(), _balanced_logistic_regression(c))  # noqa: E731
    return _best_on_validation(make, train_features, train_labels, validation_features, validation_labels)


def frozen_features(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[object], *,
                    max_length: int, max_batch_tokens: int | None = None, show_progress: bool = True,
                    description: str = "frozen features", prompt_template: str | None = None) -> np.ndarray:
    """[len(texts), hidden] float32: the backbone's final (normed) hidden state at each row's last token.

    `model` is a sequence-classification model (its `base_model` is the backbone) or a bare
    backbone. Rows run in length-sorted token-budget batches, right-padded, in inference mode, each
    text in `prompt_template` (`formatting.py`; None: as it is).
    """
    backbone = getattr(model, "base_model", model)
    input_ids = encode_prompts(tokenizer, texts, max_length, prompt_template)
    lengths = np.asarray([len(ids) for ids in input_ids])
    if len(lengths) and lengths.min() == 0:
        raise ValueError("a prompt gave no tokens; frozen features need at least one token per row")
    device = next(backbone.parameters()).device
    features: np.ndarray | None = None
    backbone.eval()
    with torch.inference_mode(), tqdm(total=len(input_ids), desc=description, unit="prompt",
                                      disable=not show_progress) as bar:
        for batch, padded in padded_batches(tokenizer, input_ids, max_batch_tokens or default_batch_tokens(device),
                                            device):
            hidden = backbone(input_ids=padded["input_ids"].to(device),
                              attention_mask=padded["attention_mask"].to(device)).last_hidden_state
            last = torch.as_tensor(lengths[batch] - 1, device=device)
            pooled = hidden[torch.arange(len(batch), device=device), last].float().cpu().numpy()
            if features is None:
                features = np.zeros((len(input_ids), pooled.shape[-1]), dtype=np.float32)
            features[batch] = pooled
            bar.update(len(batch))
    return features if features is not None else np.zeros((0, 0), dtype=np.float32)
