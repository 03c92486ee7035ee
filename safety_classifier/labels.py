"""The label schema: what the head's outputs mean.

Output 0 and 1 are the safe/unsafe pair (softmax over the two; the logit margin z = logit(unsafe)
- logit(safe) is what calibration maps to P(unsafe)). A classifier with a category head has one
more output per harm category, each read on its own through a sigmoid: multi-label, because a
prompt can be hateful and violent at once, and because a prompt of no category (most traffic)
must be able to score low on all of them, which a softmax over categories cannot express.

Both parts share one linear layer on the last real token, so the head stays the ecosystem's own
`score` of `AutoModelForSequenceClassification` with `num_labels = 2 + categories`, its outputs
named in `config.id2label`: the directory loads with the library's own calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, ModelLoadError

BINARY_LABELS = ("safe", "unsafe")
MISSING_TARGET = -1.0
"""A target a row does not have: no binary label (a contextual category), no category label
(a ToxicChat prompt flagged unsafe without saying why). It adds no loss."""

PROJECT_TAXONOMY = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Specialized Advice", "S6": "Privacy",
    "S7": "Intellectual Property", "S8": "Indiscriminate Weapons", "S9": "Hate",
    "S10": "Suicide & Self-Harm", "S11": "Sexual Content", "S12": "Defamation",
}
CONTEXTUAL_CATEGORIES = ("S5",)
"""Categories a safe assistant may answer with care (S5 Specialized Advice): the default of
--contextual-categories, and the rows the categories issue's recall goal leaves out."""


@dataclass(frozen=True)
class Category:
    code: str
    name: str


def natural_key(code: str) -> tuple:
    """S2 before S10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", code))


@dataclass(frozen=True)
class LabelSchema:
    """The binary pair, then the categories in order."""

    categories: tuple[Category, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(BINARY_LABELS) + len(self.categories)

    @property
    def has_categories(self) -> bool:
        return bool(self.categories)

    @property
    def codes(self) -> list[str]:
        return [category.code for category in self.categories]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate([*BINARY_LABELS, *self.codes]))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: index for index, label in self.id2label.items()}

    def category_index(self, code: str) -> int:
        return self.codes.index(code)

    def to_metadata(self) -> list[dict]:
        return [{"code": category.code, "name": category.name} for category in self.categories]

    @classmethod
    def from_metadata(cls, metadata: dict) -> LabelSchema:
        """The schema stored in `safety_classifier.json`; none stored (binary classifiers) = binary."""
        stored = metadata.get("categories") or []
        try:
            return cls(tuple(Category(str(entry["code"]), str(entry["name"])) for entry in stored))
        except (KeyError, TypeError) as error:
            raise ModelLoadError(f"unreadable categories {stored!r} in the classifier's metadata ({error})") from None

    @classmethod
    def from_codes(cls, codes: Iterable[str], taxonomy: dict[str, str] | None = None) -> LabelSchema:
        """Categories named by `taxonomy` (default: the project's S1-S12), in natural order."""
        names = taxonomy or PROJECT_TAXONOMY
        return cls(tuple(Category(code, names.get(code, code)) for code in sorted(set(codes), key=natural_key)))


BINARY = LabelSchema()


def read_taxonomy(path: str | Path) -> dict[str, str]:
    """Category code -> name, from JSON ({"S1": "Violent Crimes", ...}) or a CSV with `code,name` columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: taxonomy file not found")
    try:
        if path.suffix.lower() == ".json":
            payload = json.loads(path.read_text())
            if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
                raise DataError(f'{path}: expected a JSON object of code -> name, e.g. {{"S1": "Violent Crimes"}}')
            return {str(code): name for code, name in payload.items()}
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: cannot be read as a taxonomy: {error}") from error
    missing = [column for column in ("code", "name") if column not in frame.columns]
    if missing:
        raise DataError(f"{path}: taxonomy CSV needs columns code and name; missing {', '.join(missing)}")
    return dict(zip(frame["code"].str.strip(), frame["name"].str.strip()))


def split_logits(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(binary logit margins, category logits) of a (rows x num_labels) array."""
    return logits[:, 1] - logits[:, 0], logits[:, len(BINARY_LABELS):]


def category_targets(codes: Sequence[str | None], schema: LabelSchema) -> np.ndarray:
    """(rows x categories) multi-hot targets; a row without a code is MISSING_TARGET throughout."""
    targets = np.zeros((len(codes), len(schema.categories)), dtype=np.float32)
    for row, code in enumerate(codes):
        if code is None:
            targets[row] = MISSING_TARGET
        else:
            targets[row, schema.category_index(code)] = 1.0
    return targets
