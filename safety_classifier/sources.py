"""Several labelled training sources in one run, each with its own columns.

The main source is `--train-file` with `--text-column` / `--label-column` (binary, as always).
Each further source is one `--extra-train-sources` spec:

    FILE,text=COLUMN[,label=COLUMN][,category=COLUMN][,weight=W][,validation=F]

- `label`: a 0/1 column, as in the main file. `category`: a harm-category code per row (S1, S2...).
- A row without a binary label gets one from its category by `--category-rows-binary`: unsafe
  (every category row is unsafe), unsafe_except_contextual (rows of `--contextual-categories`,
  e.g. S5 specialized advice, which a safe assistant may answer with care, get no binary label
  and add no binary loss), or unlabelled (category rows add no binary loss at all).
- Rows of the main source add no category loss (ToxicChat says that a prompt is toxic, not why).
  With `--safe-rows-category-negatives` its safe rows count as "no category" (every category
  target 0), so that ordinary traffic learns to score low on all categories; off by default, as it
  cost category F1 on validation against joint category scores (`categories.py`), which keep
  ordinary traffic low too (README, *Category search*).
- `weight`: how many times each training row of the source is seen an epoch (2.0 = twice;
  1.5 = every row once and a seeded half of them twice). Validation rows are never repeated.
- `validation`: the share of the source held out for validation, stratified by category (else
  label) with the run's seed; default `--validation-fraction`.

Every row is checked before a model is loaded; an error names the file, the column and the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import (
    LabelledSplit,
    Splits,
    _require_column,
    _row_list,
    extract_labels,
    extract_texts,
    read_table,
    stratified_indices,
)
from .errors import DataError
from .labels import MISSING_TARGET, LabelSchema, category_targets, natural_key, read_taxonomy

CATEGORY_ROWS_BINARY = ("unsafe", "unsafe_except_contextual", "unlabelled")
_SPEC_KEYS = ("text", "label", "category", "weight", "validation")
AILUMINATE_SOURCE_WEIGHT = 1.2
"""How often the AILuminate file's training rows are seen an epoch (chosen on validation: README,
*Category search*)."""


def ailuminate_source_spec(path: str, weight: float | str = AILUMINATE_SOURCE_WEIGHT) -> str:
    """The `--extra-train-sources` spec of an AILuminate prompt file as the results table's category
    row trains on it: its own 25 % validation share (stratified by category), `weight` times an epoch."""
    return f"{path},text=prompt_text,category=category,validation=0.25,weight={weight}"


@dataclass
class SourceSpec:
    path: str
    text_column: str
    label_column: str | None = None
    category_column: str | None = None
    weight: float = 1.0
    validation_fraction: float | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem


def parse_source_spec(spec: str) -> SourceSpec:
    """`FILE,text=COLUMN,category=COLUMN,...` (see the module's doc)."""
    path, *pairs = [part.strip() for part in spec.split(",")]
    options: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or key not in _SPEC_KEYS or not value:
            raise DataError(f"training source {spec!r}: {pair!r} is not one of {', '.join(k + '=...' for k in _SPEC_KEYS)}")
        options[key] = value
    if not path:
        raise DataError(f"training source {spec!r}: starts with no file")
    if "text" not in options:
        raise DataError(f"training source {spec!r}: needs text=COLUMN")
    if "label" not in options and "category" not in options:
        raise DataError(f"training source {spec!r}: needs label=COLUMN, category=COLUMN or both")
    try:
        weight = float(options.get("weight", 1.0))
        fraction = float(options["validation"]) if "validation" in options else None
    except ValueError as error:
        raise DataError(f"training source {spec!r}: {error}") from None
    if not weight > 0:
        raise DataError(f"training source {spec!r}: weight must be positive, not {weight}")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise DataError(f"training source {spec!r}: validation must be between 0 and 1, not {fraction}")
    return SourceSpec(path, options["text"], options.get("label"), options.get("category"), weight, fraction)


def brings_categories(specs: list[str] | None) -> bool:
    """Whether any of these training-source specs names a category column (so a category head is trained)."""
    return any(parse_source_spec(spec).category_column for spec in specs or [])


def extract_categories(frame, column: str, source: str, known: dict[str, str] | None) -> list[str]:
    """The category code of every row; empty cells and codes outside `known` are refused with their rows."""
    _require_column(frame, column, source, "category= in --extra-train-sources")
    values = [value.strip() if isinstance(value, str) else value for value in frame[column].tolist()]
    empty = [i for i, value in enumerate(values) if not isinstance(value, str) or not value]
    if empty:
        raise DataError(f"{source}: column {column!r} has no category at row(s) {_row_list(empty)}; "
                        f"rows are numbered from 1, header excluded")
    if known is not None:
        unknown = [i for i, value in enumerate(values) if value not in known]
        if unknown:
            raise DataError(f"{source}: column {column!r} holds {values[unknown[0]]!r} at row(s) {_row_list(unknown)}, "
                            f"not a code of the taxonomy ({', '.join(sorted(known, key=natural_key))})")
    return values


@dataclass
class _LoadedSource:
    spec: SourceSpec
    texts: list[str]
    labels: np.ndarray | None
    codes: list[str] | None


def _load_source(spec: SourceSpec, taxonomy: dict[str, str] | None) -> _LoadedSource:
    frame = read_table(spec.path)
    if len(frame) == 0:
        raise DataError(f"{spec.path}: no rows")
    texts = extract_texts(frame, spec.text_column, spec.path)
    labels = extract_labels(frame, spec.label_column, spec.path) if spec.label_column else None
    codes = extract_categories(frame, spec.category_column, spec.path, taxonomy) if spec.category_column else None
    return _LoadedSource(spec, texts, labels, codes)


def binary_labels_of_categories(codes: list[str], policy: str, contextual: set[str]) -> np.ndarray:
    if policy not in CATEGORY_ROWS_BINARY:
        raise DataError(f"--category-rows-binary must be one of {', '.join(CATEGORY_ROWS_BINARY)}, not {policy!r}")
    if policy == "unlabelled":
        return np.full(len(codes), int(MISSING_TARGET), dtype=np.int64)
    unlabelled = policy == "unsafe_except_contextual"
    return np.asarray([int(MISSING_TARGET) if unlabelled and code in contextual else 1 for code in codes], dtype=np.int64)


def _as_split(source: _LoadedSource, schema: LabelSchema, policy: str, contextual: set[str]) -> LabelledSplit:
    import pandas as pd

    labels = source.labels
    if labels is None:
        labels = binary_labels_of_categories(source.codes, policy, contextual)
    categories = category_targets(source.codes or [None] * len(source.texts), schema)
    return LabelledSplit("train", source.texts, labels, pd.DataFrame(index=range(len(source.texts))), categories,
                         np.full(len(source.texts), source.spec.name, dtype=object))


def repeat_rows(split: LabelledSplit, weight: float, seed: int) -> LabelledSplit:
    """Each row floor(weight) times, plus a seeded draw of the fractional part."""
    whole, fraction = int(weight), weight - int(weight)
    indices = np.tile(np.arange(len(split)), whole)
    if fraction > 0:
        extra = np.random.default_rng(seed).choice(len(split), size=round(fraction * len(split)), replace=False)
        indices = np.concatenate([indices, np.sort(extra)])
    return split.subset(indices)


def concatenate(name: str, parts: list[LabelledSplit]) -> LabelledSplit:
    import pandas as pd

    return LabelledSplit(
        name,
        [text for part in parts for text in part.texts],
        np.concatenate([part.labels for part in parts]),
        pd.concat([part.extra for part in parts], ignore_index=True),
        np.concatenate([part.categories for part in parts]),
        np.concatenate([part.sources for part in parts]),
    )


def add_sources(
    main: Splits,
    main_name: str,
    specs: list[str],
    *,
    seed: int,
    validation_fraction: float,
    taxonomy_file: str | None = None,
    category_rows_binary: str = "unsafe",
    contextual_categories: list[str] | None = None,
    safe_rows_category_negatives: bool = False,
) -> tuple[Splits, LabelSchema]:
    """The main source's splits joined by every further source's: train and validation both carry
    category targets and each row's source; the test split (main source only) stays as it is."""
    taxonomy = read_taxonomy(taxonomy_file) if taxonomy_file else None
    loaded = [_load_source(parse_source_spec(spec), taxonomy) for spec in specs]
    codes = {code for source in loaded for code in (source.codes or [])}
    schema = LabelSchema.from_codes(codes, taxonomy)
    contextual = set(contextual_categories or [])

    def main_part(split: LabelledSplit) -> LabelledSplit:
        categories = np.full((len(split), len(schema.categories)), MISSING_TARGET, dtype=np.float32)
        if safe_rows_category_negatives:
            categories[split.labels == 0] = 0.0
        return LabelledSplit(split.name, split.texts, split.labels, split.extra, categories,
                             np.full(len(split), main_name, dtype=object))

    train_parts, validation_parts = [main_part(main.train)], [main_part(main.validation)]
    for index, source in enumerate(loaded):
        split = _as_split(source, schema, category_rows_binary, contextual)
        strata = np.asarray(source.codes) if source.codes is not None else split.labels
        fraction = source.spec.validation_fraction or validation_fraction
        held_out, kept = stratified_indices(strata, fraction, seed)
        train_parts.append(repeat_rows(split.subset(kept), source.spec.weight, seed + index))
        validation_parts.append(split.subset(held_out))
    if len({part.sources[0] for part in train_parts}) < len(train_parts):
        raise DataError(f"two training sources share a file name ({', '.join(part.sources[0] for part in train_parts)}); "
                        f"per-source metrics need distinct names")
    splits = Splits(concatenate("train", train_parts), concatenate("validation", validation_parts), main.test,
                    main_source=main_name)
    return splits, schema
