"""Several labelled training sources in one run, each with its own columns.

The main source is `--train-file` with `--text-column` / `--label-column` (binary, as always).
Each further source is one `--extra-train-sources` spec:

    FILE,text=COLUMN[,response=COLUMN][,label=COLUMN][,category=COLUMN][,weight=W][,validation=F][,cap=N][,max_length=N][,refusals=N]

- FILE may be a glob (`harm_prompts/*.csv`): one source per file, in sorted order, each named by
  its file's stem and split on its own. `@LIST` reads specs from a file, one a line (`#` comments):
  a recipe's mixture kept in one place (`recipes/all-sources.txt`).
- `label`: a 0/1 column; a cell may be blank. `category`: a harm-category code per row (S1,
  S2...); a cell may be blank. A source needs at least one of the two columns, and every row at
  least one of the two values:
  - a blank category on an unsafe row: unsafe, category unknown (binary loss, no category loss);
    on a safe row: no category loss either, unless `--safe-rows-category-negatives` (every
    category 0, as for the main source's safe rows);
  - a blank label on a row of `--contextual-categories` (e.g. S5 specialized advice, which a safe
    assistant may answer with care): no binary label, no binary loss;
  - a blank label on another category row, or every row of a source without a label column,
    follows `--category-rows-binary`: unsafe, unsafe_except_contextual (contextual rows get no
    binary label), or unlabelled (no binary loss at all);
  - a row with neither is refused; so is a safe row with a category outside the contextual ones
    (a category names the harm of an unsafe prompt).
  A source with only safe or only unsafe rows is fine: the class weights and the calibration
  come from the main source.
- `response`: each row is a `formatting.PromptResponse` (the `text` column's prompt, this
  column's answer) and its label judges the answer.
- Rows of the main source add no category loss (ToxicChat says that a prompt is toxic, not why),
  except its safe rows under `--safe-rows-category-negatives`.
- `weight`: how many times each training row of the source is seen an epoch (2.0 = twice;
  1.5 = every row once and a seeded half of them twice). Validation rows are never repeated.
- `validation`: the share of the source held out for validation, stratified by category where a
  row has one, else by label, with the run's seed; default `--validation-fraction`.
- `cap`: at most N training rows of the source, a seeded sample stratified as above, drawn after
  the validation split and before `weight`.
- `max_length`: the source's rows are cut to N tokens in training (never more than `--max-length`),
  so that long role-play prompts cost less; validation is scored as the classifier will score.
- `refusals`: N of the source's unsafe training prompts also enter the response task, each with a
  refusal as its answer, labelled safe (`refusals.py`); up to N/2 of its unsafe validation prompts
  likewise, with wordings no training pair has. Every source's pairs form one source, `refusals`.
  Refusals take the source's own `max_length`. It needs a response source beside it, whose rows
  choose the response threshold.

Every row is checked before a model is loaded; an error names the file, the column and the row.
"""

from __future__ import annotations

import glob
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .data import (
    LabelledSplit,
    Splits,
    extract_optional_labels,
    extract_texts,
    read_table,
    require_column,
    row_list,
    stratified_indices,
)
from .errors import DataError
from .formatting import PromptResponse
from .labels import MISSING_TARGET, LabelSchema, category_targets, natural_key, read_taxonomy
from .refusals import REFUSALS_SOURCE, refusal_pairs

CATEGORY_ROWS_BINARY = ("unsafe", "unsafe_except_contextual", "unlabelled")
_SPEC_KEYS = ("text", "response", "label", "category", "weight", "validation", "cap", "max_length", "refusals")
AILUMINATE_SOURCE_WEIGHT = 1.2
"""How often the AILuminate file's training rows are seen an epoch (chosen on validation)."""
LOOKALIKE_SOURCES = ("hatecheck", "toxigen_statements", "cyberseceval", "do_not_answer")
"""Sources (by file stem) whose safe rows look like harm (counter-speech, neutral statements about
groups, benign security code, questions about the assistant): their false-positive rate together
is the look-alike FPR of the metrics."""


def ailuminate_source_spec(path: str, weight: float | str = AILUMINATE_SOURCE_WEIGHT) -> str:
    """The `--extra-train-sources` spec of an AILuminate prompt file as the results table's category
    row trains on it: its own validation share (stratified by category), `weight` times an epoch.
    `python -m safety_classifier.sources FILE` prints it, so that `make demo` trains the same way."""
    return f"{path},text=prompt_text,category=category,validation=0.25,weight={weight}"


@dataclass
class SourceSpec:
    path: str
    text_column: str
    label_column: str | None = None
    category_column: str | None = None
    weight: float = 1.0
    validation_fraction: float | None = None
    response_column: str | None = None
    cap: int | None = None
    max_length: int | None = None
    refusals: int | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem


def _positive_int(spec: str, key: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise DataError(f"training source {spec!r}: {key} must be a whole number of at least 1, not {value!r}")
    return number


def parse_source_spec(spec: str) -> SourceSpec:
    """`FILE,text=COLUMN,category=COLUMN,...` (see the module's doc); FILE may still be a glob."""
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
    if "refusals" in options and "response" in options:
        raise DataError(f"training source {spec!r}: refusals= pairs a prompt source's prompts with refusals; "
                        f"a source with response= has answers of its own")
    return SourceSpec(path, options["text"], options.get("label"), options.get("category"), weight, fraction,
                      options.get("response"), _positive_int(spec, "cap", options.get("cap")),
                      _positive_int(spec, "max_length", options.get("max_length")),
                      _positive_int(spec, "refusals", options.get("refusals")))


def expand_source_spec(spec: SourceSpec) -> list[SourceSpec]:
    """One spec per file: the file itself, or every file its glob matches, sorted."""
    if not glob.has_magic(spec.path):
        return [spec]
    paths = sorted(path for path in glob.glob(spec.path) if Path(path).is_file())
    if not paths:
        raise DataError(f"training source {spec.path!r}: no file matches this pattern")
    return [replace(spec, path=path) for path in paths]


def spec_lines(specs: list[str] | None) -> list[str]:
    """The specs as given, an `@FILE` replaced by the specs in that file: one a line, blank lines
    and `#` comments skipped, paths as they would be written on the command line."""
    lines = []
    for spec in specs or []:
        if not spec.startswith("@"):
            lines.append(spec)
            continue
        try:
            text = Path(spec[1:]).read_text()
        except OSError as error:
            raise DataError(f"training sources file {spec[1:]!r}: {error.strerror}") from None
        lines += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def source_specs(specs: list[str] | None) -> list[SourceSpec]:
    """Every `--extra-train-sources` spec parsed, `@FILE` lists read, globs expanded."""
    return [expanded for spec in spec_lines(specs) for expanded in expand_source_spec(parse_source_spec(spec))]


def brings_categories(specs: list[str] | None) -> bool:
    """Whether any of these training-source specs names a category column (so a category head is trained)."""
    return any(parse_source_spec(spec).category_column for spec in spec_lines(specs))


def extract_categories(frame, column: str, source: str, known: dict[str, str] | None) -> list[str | None]:
    """The category code of every row, None where the cell is blank; codes outside `known` are
    refused with their rows."""
    require_column(frame, column, source, "category= in --extra-train-sources")
    values = [value.strip() if isinstance(value, str) else value for value in frame[column].tolist()]
    values = [value if isinstance(value, str) and value else None for value in values]
    if known is not None:
        unknown = [i for i, value in enumerate(values) if value is not None and value not in known]
        if unknown:
            raise DataError(f"{source}: column {column!r} holds {values[unknown[0]]!r} at row(s) {row_list(unknown)}, "
                            f"not a code of the taxonomy ({', '.join(sorted(known, key=natural_key))})")
    return values


@dataclass
class _LoadedSource:
    spec: SourceSpec
    texts: list
    labels: np.ndarray  # MISSING_TARGET (-1) where a row has no binary label
    codes: list[str | None]  # None where a row has no category


def binary_labels_of_categories(codes: list[str], policy: str, contextual: set[str]) -> np.ndarray:
    if policy not in CATEGORY_ROWS_BINARY:
        raise DataError(f"--category-rows-binary must be one of {', '.join(CATEGORY_ROWS_BINARY)}, not {policy!r}")
    if policy == "unlabelled":
        return np.full(len(codes), int(MISSING_TARGET), dtype=np.int64)
    unlabelled = policy == "unsafe_except_contextual"
    return np.asarray([int(MISSING_TARGET) if unlabelled and code in contextual else 1 for code in codes], dtype=np.int64)


def _source_texts(frame, spec: SourceSpec) -> list:
    texts = extract_texts(frame, spec.text_column, spec.path)
    if spec.response_column is None:
        return texts
    require_column(frame, spec.response_column, spec.path, "response= in --extra-train-sources")
    responses = extract_texts(frame, spec.response_column, spec.path)
    return [PromptResponse(prompt, response) for prompt, response in zip(texts, responses)]


def _load_source(spec: SourceSpec, taxonomy: dict[str, str] | None, policy: str, contextual: set[str]) -> _LoadedSource:
    """A source's rows with every row's binary label and category resolved (the module's doc)."""
    frame = read_table(spec.path)
    if len(frame) == 0:
        raise DataError(f"{spec.path}: no rows")
    texts = _source_texts(frame, spec)
    codes = (extract_categories(frame, spec.category_column, spec.path, taxonomy) if spec.category_column
             else [None] * len(texts))
    if spec.label_column is None:
        empty = [i for i, code in enumerate(codes) if code is None]
        if empty:
            raise DataError(f"{spec.path}: column {spec.category_column!r} has no category at row(s) {row_list(empty)}, "
                            f"and the source has no label column (label=); rows are numbered from 1, header excluded")
        return _LoadedSource(spec, texts, binary_labels_of_categories(codes, policy, contextual), codes)
    labels = extract_optional_labels(frame, spec.label_column, spec.path)
    neither = [i for i, (label, code) in enumerate(zip(labels, codes)) if label < 0 and code is None]
    if neither:
        where = f"nor a category (column {spec.category_column!r})" if spec.category_column else "(no category= column)"
        raise DataError(f"{spec.path}: row(s) {row_list(neither)} have neither a label (column {spec.label_column!r}) "
                        f"{where}; rows are numbered from 1, header excluded")
    safe_harm = [i for i, (label, code) in enumerate(zip(labels, codes))
                 if label == 0 and code is not None and code not in contextual]
    if safe_harm:
        raise DataError(f"{spec.path}: row(s) {row_list(safe_harm)} are safe (column {spec.label_column!r}) but carry "
                        f"category {codes[safe_harm[0]]!r} (column {spec.category_column!r}): a category names the harm "
                        f"of an unsafe prompt; leave it blank on safe rows")
    # A blank label takes the category's binary label; a contextual category's blank label stays blank.
    by_policy = binary_labels_of_categories([code or "" for code in codes], policy, set())
    labels = np.where(labels >= 0, labels,
                      np.where([code in contextual for code in codes], int(MISSING_TARGET), by_policy))
    return _LoadedSource(spec, texts, labels.astype(np.int64), codes)


def _category_targets(source: _LoadedSource, schema: LabelSchema, safe_rows_category_negatives: bool) -> np.ndarray:
    """Category targets; a row without a category has none (MISSING_TARGET), or every category 0
    where it is safe and `safe_rows_category_negatives`."""
    targets = category_targets(source.codes, schema)
    if safe_rows_category_negatives:
        targets[np.asarray([code is None for code in source.codes]) & (source.labels == 0)] = 0.0
    return targets


def _uncategorised_targets(labels: np.ndarray, schema: LabelSchema, safe_rows_category_negatives: bool) -> np.ndarray:
    """Category targets of rows from a source without categories (the main file, the refusals): none
    (MISSING_TARGET), or every category 0 on a safe row where `safe_rows_category_negatives`."""
    targets = np.full((len(labels), len(schema.categories)), MISSING_TARGET, dtype=np.float32)
    if safe_rows_category_negatives:
        targets[labels == 0] = 0.0
    return targets


def _as_split(source: _LoadedSource, schema: LabelSchema, safe_rows_category_negatives: bool) -> LabelledSplit:
    import pandas as pd

    rows = len(source.texts)
    return LabelledSplit("train", source.texts, source.labels, pd.DataFrame(index=range(rows)),
                         _category_targets(source, schema, safe_rows_category_negatives),
                         np.full(rows, source.spec.name, dtype=object),
                         np.full(rows, source.spec.max_length or 0, dtype=np.int64))


def source_strata(source: _LoadedSource) -> np.ndarray:
    """What a source's samples are stratified by: each row's category, else its label."""
    return pooled_strata(np.asarray([code if code is not None else f"label {label}"
                                     for code, label in zip(source.codes, source.labels)], dtype=object))


def pooled_strata(keys: np.ndarray) -> np.ndarray:
    """Strata of a single row pooled (a stratified split needs two of each), into the largest if still alone."""
    values, counts = np.unique(keys, return_counts=True)
    lonely = values[counts < 2]
    if len(lonely):
        pooled = "pooled" if len(lonely) > 1 else values[np.argmax(counts)]
        keys = np.where(np.isin(keys, lonely), pooled, keys)
    return keys


def _sample(strata: np.ndarray, size: int | float, seed: int, source: SourceSpec, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return stratified_indices(strata, size, seed)
    except DataError as error:
        raise DataError(f"{source.path}: {what}: {error}") from None


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
        np.concatenate([np.zeros(len(part), dtype=np.int64) if part.max_lengths is None else part.max_lengths
                        for part in parts]),
    )


def _grouped_sample(strata: np.ndarray, groups: list[str], size: float, seed: int,
                    source: SourceSpec) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rest) row indices with every group's rows on one side: the groups are drawn,
    stratified by their first row's stratum."""
    _, first, inverse = np.unique(np.asarray(groups, dtype=object), return_index=True, return_inverse=True)
    chosen_groups, _ = _sample(pooled_strata(strata[first]), size, seed, source,
                               f"holding out a validation share of {size} of its prompts")
    chosen = np.isin(inverse, chosen_groups)
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def _split_source(split: LabelledSplit, strata: np.ndarray, spec: SourceSpec, validation_fraction: float,
                  seed: int) -> tuple[LabelledSplit, LabelledSplit]:
    """(training rows, validation rows) of one source: its stratified validation share, then `cap`."""
    fraction = spec.validation_fraction or validation_fraction
    if spec.response_column is not None:
        # Several answers to one prompt: each prompt on one side only, or validation would grade
        # answers to prompts the model trained on.
        held_out, kept = _grouped_sample(strata, [pair.prompt for pair in split.texts], fraction, seed, spec)
    else:
        held_out, kept = _sample(strata, fraction, seed, spec, f"holding out a validation share of {fraction}")
    if spec.cap is not None and spec.cap < len(kept):
        # The validation draw may leave a stratum one row: pool again before drawing the cap.
        kept_strata = pooled_strata(strata[kept])
        if spec.cap >= len(np.unique(kept_strata)):
            chosen, _ = _sample(kept_strata, spec.cap, seed, spec, f"drawing cap={spec.cap} training rows")
        else:  # fewer rows than strata: a stratified draw is impossible, a seeded plain one is not
            chosen = np.sort(np.random.default_rng(seed).choice(len(kept), size=spec.cap, replace=False))
        kept = kept[chosen]
    return split.subset(kept), split.subset(held_out)


def _refusal_split(split: LabelledSplit, spec: SourceSpec, count: int, seed: int, held_out: bool,
                   schema: LabelSchema, safe_rows_category_negatives: bool) -> LabelledSplit:
    """`count` of the split's unsafe prompts, each with a refusal (`refusals.refusal_pairs`), safe."""
    import pandas as pd

    prompts = [text for text, label in zip(split.texts, split.labels) if label == 1 and isinstance(text, str)]
    pairs = refusal_pairs(prompts, count, seed, held_out=held_out)
    labels = np.zeros(len(pairs), dtype=np.int64)
    return LabelledSplit(split.name, pairs, labels, pd.DataFrame(index=range(len(pairs))),
                         _uncategorised_targets(labels, schema, safe_rows_category_negatives),
                         np.full(len(pairs), REFUSALS_SOURCE, dtype=object),
                         np.full(len(pairs), spec.max_length or 0, dtype=np.int64))


def judged_response_rows(split: LabelledSplit) -> np.ndarray:
    """The pair rows of the response sources, without the generated refusals: the rows the response
    threshold is chosen on and the response metrics measure."""
    pairs = split.pair_rows
    return pairs if split.sources is None else pairs[split.sources[pairs] != REFUSALS_SOURCE]


def _require_response_validation(validation: LabelledSplit) -> None:
    """The response threshold is chosen on the response sources' validation rows: refuse, before
    any model loads, a run whose response rows leave it nothing to choose by."""
    pairs = judged_response_rows(validation)
    if not len(pairs):
        return
    labels = validation.labels[pairs]
    if not ((labels == 0).any() and (labels == 1).any()):
        names = ", ".join(dict.fromkeys(validation.sources[pairs]))
        raise DataError(f"the validation rows of the response source(s) {names} need both safe (0) and unsafe (1) "
                        f"rows to choose the response threshold by; raise their validation= share")


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
    main_weight: float = 1.0,
) -> tuple[Splits, LabelSchema]:
    """The main source's splits joined by every further source's: train and validation both carry
    category targets, each row's source and its own token limit; the test split (main source
    only) stays as it is. `main_weight` is the main source's training weight, as a spec's weight=."""
    if category_rows_binary not in CATEGORY_ROWS_BINARY:
        raise DataError(f"--category-rows-binary must be one of {', '.join(CATEGORY_ROWS_BINARY)}, "
                        f"not {category_rows_binary!r}")
    taxonomy = read_taxonomy(taxonomy_file) if taxonomy_file else None
    contextual = set(contextual_categories or [])
    loaded = [_load_source(spec, taxonomy, category_rows_binary, contextual) for spec in source_specs(specs)]
    names = [main_name, *(source.spec.name for source in loaded)]
    if len(set(names)) < len(names):
        raise DataError(f"two training sources share a file name ({', '.join(names)}); per-source metrics need "
                        f"distinct names")
    if REFUSALS_SOURCE in names:
        raise DataError(f"a training source is named {REFUSALS_SOURCE!r}, the name of the refusals that refusals= "
                        f"generates; rename its file")
    if any(source.spec.refusals for source in loaded) and not any(source.spec.response_column for source in loaded):
        raise DataError("refusals= teaches the response task: it needs a response source (response=) beside it, "
                        "whose validation rows choose the response threshold")
    codes = {code for source in loaded for code in source.codes if code is not None}
    schema = LabelSchema.from_codes(codes, taxonomy)

    def main_part(split: LabelledSplit) -> LabelledSplit:
        return LabelledSplit(split.name, split.texts, split.labels, split.extra,
                             _uncategorised_targets(split.labels, schema, safe_rows_category_negatives),
                             np.full(len(split), main_name, dtype=object))

    # The further sources draw their fractional repeats with seed + index; the main source after them.
    train_parts = [repeat_rows(main_part(main.train), main_weight, seed + len(loaded))]
    validation_parts = [main_part(main.validation)]
    refused_train, refused_validation = [], []
    for index, source in enumerate(loaded):
        spec = source.spec
        train, validation = _split_source(_as_split(source, schema, safe_rows_category_negatives),
                                          source_strata(source), spec, validation_fraction, seed)
        train_parts.append(repeat_rows(train, spec.weight, seed + index))
        validation_parts.append(validation)
        if spec.refusals:
            refused = _refusal_split(train, spec, spec.refusals, seed + index, False, schema, safe_rows_category_negatives)
            if len(refused) < spec.refusals:
                warnings.warn(f"{spec.path}: refusals={spec.refusals}, but its training rows hold only {len(refused)} "
                              f"unsafe prompts with a label", stacklevel=2)
            refused_train.append(refused)
            refused_validation.append(_refusal_split(validation, spec, spec.refusals // 2, seed + index, True, schema,
                                                     safe_rows_category_negatives))
    if refused_train:
        train_parts.append(concatenate("train", refused_train))
        validation_parts.append(concatenate("validation", refused_validation))
    splits = Splits(concatenate("train", train_parts), concatenate("validation", validation_parts), main.test,
                    main_source=main_name)
    _require_response_validation(splits.validation)
    return splits, schema


def describe_sources(splits: Splits) -> list[str]:
    """The start-up lines of a run with several sources: per source, an epoch's training rows,
    validation rows, the unsafe share of its labelled training rows, the categories present, and
    whether its rows are responses or have their own token limit."""
    train, validation = splits.train, splits.validation
    if train.sources is None:
        return []
    codes = splits.schema.codes
    lines = ["sources (an epoch's training rows / validation rows, unsafe share of the rows with a label, categories):"]
    for name in dict.fromkeys(train.sources):
        rows = np.flatnonzero(train.sources == name)
        held_out = int((validation.sources == name).sum())
        labels = train.labels[rows][train.labels[rows] >= 0]
        share = f"{labels.mean():.1%} unsafe" if len(labels) else "no binary labels"
        present = ([code for index, code in enumerate(codes) if (train.categories[rows, index] == 1).any()]
                   if train.categories is not None and train.categories.shape[1] else [])
        notes = [f"categories {' '.join(present) if present else 'none'}"]
        if any(isinstance(train.texts[row], PromptResponse) for row in rows):
            notes.append("responses")
        own_limits = set(train.max_lengths[rows].tolist()) - {0} if train.max_lengths is not None else set()
        if own_limits:
            notes.append(f"max_length {min(own_limits)}")
        lines.append(f"  {name}{' (main)' if name == splits.main_source else ''}: {len(rows)} / {held_out}, "
                     f"{share}, {', '.join(notes)}")
    return lines
