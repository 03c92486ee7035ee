"""Loading and checking labelled prompts: ToxicChat from the hub, or local CSV/JSONL/JSON/Parquet.

Every check runs before a model is loaded, and every error names the file, the column or the
row (1-based, header excluded) so that a user can fix the data without reading a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .errors import DataError
from .labels import BINARY, LabelSchema

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".txt")


@dataclass
class LabelledSplit:
    """Prompts and 0/1 labels of one split, plus the source's other columns (e.g. `jailbreaking`).

    With several training sources (`sources.py`), a label may be MISSING_TARGET (-1: the row has
    no binary label), `categories` holds each row's multi-hot category targets (a row without a
    category label: MISSING_TARGET throughout), and `sources` names each row's source. A text may
    be a `formatting.PromptResponse` (a source with `response=`: the label judges the answer), and
    `max_lengths` holds each row's own token limit (0: the run's `--max-length`).
    """

    name: str
    texts: list
    labels: np.ndarray
    extra: pd.DataFrame
    categories: np.ndarray | None = None
    sources: np.ndarray | None = None
    max_lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> LabelledSplit:
        return LabelledSplit(
            self.name,
            [self.texts[i] for i in indices],
            self.labels[indices],
            self.extra.iloc[indices].reset_index(drop=True),
            None if self.categories is None else self.categories[indices],
            None if self.sources is None else self.sources[indices],
            None if self.max_lengths is None else self.max_lengths[indices],
        )

    @property
    def binary_rows(self) -> np.ndarray:
        """Indices of the rows with a binary label (all of them for a single binary source)."""
        return np.flatnonzero(self.labels >= 0)

    @property
    def pair_rows(self) -> np.ndarray:
        """Indices of the rows that are (prompt, response) pairs."""
        from .formatting import PromptResponse

        return np.asarray([i for i, text in enumerate(self.texts) if isinstance(text, PromptResponse)], dtype=np.int64)

    @property
    def has_pairs(self) -> bool:
        return len(self.pair_rows) > 0

    def row_max_lengths(self, max_length: int) -> np.ndarray:
        """Each row's token limit under a run's `max_length`: its source's own where smaller."""
        if self.max_lengths is None:
            return np.full(len(self), max_length, dtype=np.int64)
        return np.where((self.max_lengths > 0) & (self.max_lengths < max_length), self.max_lengths, max_length)


@dataclass
class Splits:
    train: LabelledSplit
    validation: LabelledSplit
    test: LabelledSplit | None
    schema: LabelSchema = BINARY
    """What the head predicts: safe/unsafe, and the categories when a source has them."""
    main_source: str | None = None
    """With several sources, the name of the main one (`--train-file`): the traffic the classifier is for."""

    @property
    def calibration_rows(self) -> np.ndarray:
        """Validation rows that calibration, the decision threshold and the headline validation
        metrics are fitted and measured on: those with a binary label from the main source. The
        test split is the main source's too; further sources (e.g. category prompts, all unsafe)
        would shift the base rate that P(unsafe) is fitted to away from that traffic."""
        validation = self.validation
        if validation.sources is None:
            return validation.binary_rows
        return np.flatnonzero((validation.labels >= 0) & (validation.sources == self.main_source))


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, JSONL, JSON or Parquet file (by suffix), or a .txt file with one prompt a line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        text = decode_utf8(path.read_bytes(), str(path))
        if suffix == ".csv":
            _check_csv_header(text, path)
            return pd.read_csv(io.StringIO(text), dtype=object, keep_default_na=False)
        if suffix == ".jsonl":
            return pd.read_json(io.StringIO(text), lines=True, dtype=False)
        if suffix == ".json":
            return _read_json(text)
        return pd.DataFrame({"text": [line for line in text.splitlines() if line.strip()]})
    except DataError:
        raise
    except (ValueError, pd.errors.ParserError, OSError) as error:
        raise DataError(f"{path}: cannot be read as {suffix[1:].upper()}: {error}") from error


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def decode_utf8(raw: bytes, source: str) -> str:
    """Decode UTF-8; invalid bytes become U+FFFD and a warning names their lines, so that
    every line still gets an answer instead of the whole file being refused."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # surrogateescape maps each invalid byte to one code point in U+DC80..U+DCFF: one pass finds the lines.
    escaped = raw.decode("utf-8", errors="surrogateescape").split("\n")
    lines = [number for number, line in enumerate(escaped, start=1) if _ESCAPED_BYTE.search(line)]
    shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")
    warnings.warn(f"{source}: invalid UTF-8 on line(s) {shown}; the bad bytes were replaced with U+FFFD", stacklevel=2)
    return raw.decode("utf-8", errors="replace")


def _check_csv_header(text: str, path: Path) -> None:
    header = next(csv.reader(io.StringIO(text)), None)
    if not header:
        raise DataError(f"{path}: empty file, expected a header row")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}: duplicated column name(s) in the header: {', '.join(duplicated)}")


def _read_json(text: str) -> pd.DataFrame:
    payload = json.loads(text)
    if isinstance(payload, dict):
        # {"data": [...]} and other single-key wrappers, or column-oriented dicts.
        lists = [value for value in payload.values() if isinstance(value, list)]
        if len(payload) == 1 and lists and isinstance(lists[0][0] if lists[0] else {}, dict):
            payload = lists[0]
    return pd.DataFrame(payload)


def require_column(frame: pd.DataFrame, column: str, source: str, option: str) -> None:
    """Refuse a table without `column`, naming the option that chose it and the columns it has."""
    if column not in frame.columns:
        available = ", ".join(map(str, frame.columns)) or "none"
        raise DataError(f"{source}: no column {column!r} (set {option}); columns present: {available}")


def row_list(rows: list[int], limit: int = 5) -> str:
    """The first `limit` of these 0-based rows as a reader counts them (from 1), and how many more."""
    shown = ", ".join(str(row + 1) for row in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def extract_texts(frame: pd.DataFrame, column: str, source: str) -> list[str]:
    """The prompts of `column`; empty, missing or non-text values are refused with their rows."""
    require_column(frame, column, source, "--text-column")
    values = frame[column].tolist()
    bad = [i for i, value in enumerate(values) if not isinstance(value, str) or not value.strip()]
    if bad:
        first = values[bad[0]]
        what = "empty" if isinstance(first, str) or first is None or _is_nan(first) else f"not text ({first!r})"
        raise DataError(
            f"{source}: column {column!r} has empty or non-text prompts at row(s) {row_list(bad)} "
            f"(row {bad[0] + 1} is {what}); rows are numbered from 1, header excluded"
        )
    return values


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def parse_label(value: object) -> int | None:
    """0/1 as int, bool, integral float or the strings '0'/'1'/'true'/'false'; None otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return int(value)
    if isinstance(value, (float, np.floating)) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, str):
        return {"0": 0, "1": 1, "false": 0, "true": 1}.get(value.strip().lower())
    return None


def extract_labels(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    require_column(frame, column, source, "--label-column")
    parsed = [parse_label(value) for value in frame[column].tolist()]
    bad = [i for i, label in enumerate(parsed) if label is None]
    if bad:
        raise DataError(
            f"{source}: column {column!r} must hold 0 (safe) or 1 (unsafe); row(s) {row_list(bad)} do not "
            f"(row {bad[0] + 1} holds {frame[column].iloc[bad[0]]!r}); rows are numbered from 1, header excluded"
        )
    return np.asarray(parsed, dtype=np.int64)


def extract_optional_labels(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """0/1 labels where a cell may be blank (MISSING_TARGET, -1: the row has no binary label);
    anything else is refused with its rows."""
    require_column(frame, column, source, "label= in --extra-train-sources")
    values = frame[column].tolist()
    blank = [value is None or _is_nan(value) or (isinstance(value, str) and not value.strip()) for value in values]
    parsed = [None if empty else parse_label(value) for value, empty in zip(values, blank)]
    bad = [i for i, (label, empty) in enumerate(zip(parsed, blank)) if label is None and not empty]
    if bad:
        raise DataError(
            f"{source}: column {column!r} must hold 0 (safe), 1 (unsafe) or nothing; row(s) {row_list(bad)} do not "
            f"(row {bad[0] + 1} holds {values[bad[0]]!r}); rows are numbered from 1, header excluded"
        )
    return np.asarray([-1 if label is None else label for label in parsed], dtype=np.int64)


def require_both_classes(labels: np.ndarray, source: str) -> None:
    present = set(np.unique(labels).tolist())
    if present != {0, 1}:
        only = "safe (0)" if present == {0} else "unsafe (1)" if present == {1} else "no"
        raise DataError(f"{source}: needs both safe (0) and unsafe (1) rows, but has only {only} rows")


def labelled_split(frame: pd.DataFrame, name: str, source: str, text_column: str, label_column: str) -> LabelledSplit:
    if len(frame) == 0:
        raise DataError(f"{source}: no rows")
    texts = extract_texts(frame, text_column, source)
    labels = extract_labels(frame, label_column, source)
    extra = frame.drop(columns=[text_column, label_column]).reset_index(drop=True)
    return LabelledSplit(name, texts, labels, extra)


def _load_hub_frames(dataset: str, config: str | None) -> dict[str, pd.DataFrame]:
    try:
        import datasets

        loaded = datasets.load_dataset(dataset, config)
    except Exception as error:  # the hub raises many kinds: offline, gated, missing config
        raise DataError(
            f"cannot load {dataset!r} (config {config!r}) from the hub: {error}. "
            f"Offline, pass local files with --train-file/--validation-file/--test-file"
        ) from error
    return {name: split.to_pandas() for name, split in loaded.items()}


def stratified_indices(labels: np.ndarray, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (chosen, rest), stratified by label, reproducible for a seed."""
    indices = np.arange(len(labels))
    try:
        chosen, rest = train_test_split(indices, train_size=size, stratify=labels, random_state=seed)
    except ValueError as error:
        raise DataError(f"cannot draw a stratified sample of {size} from {len(labels)} rows: {error}") from error
    return np.sort(chosen), np.sort(rest)


def load_splits(
    *,
    train_file: str | None,
    validation_file: str | None,
    test_file: str | None,
    text_column: str,
    label_column: str,
    validation_fraction: float,
    seed: int,
    max_train_samples: int | None = None,
    dataset: str = "lmsys/toxic-chat",
    dataset_config: str | None = "toxicchat0124",
) -> Splits:
    """Train, validation and (optional) test splits, all checked before any model is loaded.

    Without a validation file, a stratified `validation_fraction` of train is held out with
    `seed`; `max_train_samples` then draws a stratified subset of what is left for training.
    """
    if train_file is None and (validation_file or test_file):
        raise DataError("--validation-file and --test-file need --train-file too")
    if train_file is not None:
        frames = {"train": (read_table(train_file), train_file)}
        if validation_file:
            frames["validation"] = (read_table(validation_file), validation_file)
        if test_file:
            frames["test"] = (read_table(test_file), test_file)
    else:
        hub = _load_hub_frames(dataset, dataset_config)
        frames = {name: (frame, f"{dataset}[{name}]") for name, frame in hub.items() if name in ("train", "validation", "test")}
        if "train" not in frames:
            raise DataError(f"{dataset}: has no 'train' split (splits: {', '.join(hub)})")

    splits = {
        name: labelled_split(frame, name, source, text_column, label_column) for name, (frame, source) in frames.items()
    }
    train = splits["train"]
    require_both_classes(train.labels, frames["train"][1])
    if "validation" in splits:
        validation = splits["validation"]
    else:
        if not 0.0 < validation_fraction < 1.0:
            raise DataError(f"--validation-fraction must be between 0 and 1, not {validation_fraction}")
        held_out, kept = stratified_indices(train.labels, validation_fraction, seed)
        validation, train = train.subset(held_out), train.subset(kept)
        validation.name = "validation"
    require_both_classes(validation.labels, f"{frames.get('validation', frames['train'])[1]} (validation split)")
    if max_train_samples is not None and max_train_samples < len(train):
        chosen, _ = stratified_indices(train.labels, max_train_samples, seed)
        train = train.subset(chosen)
    require_both_classes(train.labels, f"{frames['train'][1]} (training rows after sampling)")
    return Splits(train=train, validation=validation, test=splits.get("test"))


def read_prompts(path: str | Path, text_column: str | None) -> pd.DataFrame:
    """Prompts to score from a file: .txt (one a line) or a table with `text_column`."""
    frame = read_table(path)
    if Path(path).suffix.lower() == ".txt":
        return frame.rename(columns={"text": text_column or "text"})
    require_column(frame, text_column, str(path), "--text-column")
    return frame
