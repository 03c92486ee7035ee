"""Data loading: every bad input gives an error that names the file, the column or the row."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_rows

from safety_classifier.data import load_splits, read_table
from safety_classifier.errors import DataError


def splits_of(train_file, **overrides):
    options = dict(train_file=str(train_file), validation_file=None, test_file=None, text_column="user_input",
                   label_column="toxicity", validation_fraction=0.2, seed=0)
    options.update(overrides)
    return load_splits(**options)


def write_csv(tmp_path, frame, name="data.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        splits_of(tmp_path / "nope.csv")


def test_unsupported_suffix_is_refused(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        read_table(path)


def test_missing_column_is_named_with_the_columns_present(tmp_path):
    path = write_csv(tmp_path, synthetic_rows(20, 0))
    with pytest.raises(DataError, match=r"no column 'prompt' \(set --text-column\); columns present: user_input"):
        splits_of(path, text_column="prompt")
    with pytest.raises(DataError, match=r"no column 'label' \(set --label-column\)"):
        splits_of(path, label_column="label")


def test_empty_prompt_is_reported_with_its_row(tmp_path):
    frame = synthetic_rows(20, 0)
    frame.loc[6, "user_input"] = "   "
    with pytest.raises(DataError, match=r"empty or non-text prompts at row\(s\) 7 "):
        splits_of(write_csv(tmp_path, frame))


def test_non_text_prompt_is_reported_with_its_row(tmp_path):
    rows = synthetic_rows(20, 0).to_dict("records")
    rows[3]["user_input"] = 12345
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(DataError, match=r"row\(s\) 4 \(row 4 is not text \(12345\)\)"):
        splits_of(path)


@pytest.mark.parametrize("bad_value", ["2", "unsafe", "0.5", ""])
def test_labels_other_than_0_1_are_reported(tmp_path, bad_value):
    frame = synthetic_rows(20, 0).astype({"toxicity": object})
    frame.loc[9, "toxicity"] = bad_value
    with pytest.raises(DataError, match=r"'toxicity' must hold 0 \(safe\) or 1 \(unsafe\); row\(s\) 10 do not"):
        splits_of(write_csv(tmp_path, frame))


def test_a_single_class_training_file_is_refused(tmp_path):
    frame = synthetic_rows(20, 0)
    frame["toxicity"] = 0
    with pytest.raises(DataError, match=r"needs both safe \(0\) and unsafe \(1\) rows, but has only safe \(0\) rows"):
        splits_of(write_csv(tmp_path, frame))


def test_a_single_class_validation_file_is_refused(tmp_path):
    validation = synthetic_rows(10, 1)
    validation["toxicity"] = 1
    with pytest.raises(DataError, match=r"valid\.csv .*only unsafe \(1\) rows"):
        splits_of(write_csv(tmp_path, synthetic_rows(20, 0)), validation_file=str(write_csv(tmp_path, validation, "valid.csv")))


def test_duplicated_header_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("user_input,toxicity,toxicity\nhello,0,0\nbomb,1,1\n")
    with pytest.raises(DataError, match=r"duplicated column name\(s\) in the header: toxicity"):
        splits_of(path)


def test_files_of_every_format_give_the_same_rows(tmp_path):
    frame = synthetic_rows(30, 3)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "d.json", orient="records")
    frame.to_parquet(tmp_path / "d.parquet")
    loaded = [splits_of(tmp_path / f"d.{suffix}") for suffix in ("csv", "jsonl", "json", "parquet")]
    for splits in loaded[1:]:
        assert splits.train.texts == loaded[0].train.texts
        np.testing.assert_array_equal(splits.train.labels, loaded[0].train.labels)


def test_validation_is_a_stratified_reproducible_holdout(tmp_path):
    frame = synthetic_rows(200, 4)
    path = write_csv(tmp_path, frame)
    first, again, other_seed = splits_of(path), splits_of(path), splits_of(path, seed=1)
    assert first.validation.texts == again.validation.texts
    assert first.validation.texts != other_seed.validation.texts
    assert len(first.validation) == 40 and len(first.train) == 160
    share = frame.toxicity.mean()
    assert abs(first.validation.labels.mean() - share) < 0.03
    # No row is both trained on and validated on (texts repeat in the fixture, so compare indices).
    assert len(first.train) + len(first.validation) == len(frame)


def test_max_train_samples_draws_a_stratified_subset(tmp_path):
    splits = splits_of(write_csv(tmp_path, synthetic_rows(200, 5)), max_train_samples=30)
    assert len(splits.train) == 30
    assert set(splits.train.labels.tolist()) == {0, 1}
    assert len(splits.validation) == 40


def test_extra_columns_are_kept_for_reporting(tmp_path):
    test_file = str(write_csv(tmp_path, synthetic_rows(20, 7), "t.csv"))
    splits = splits_of(write_csv(tmp_path, synthetic_rows(50, 6)), test_file=test_file)
    assert list(splits.test.extra.columns) == ["jailbreaking"]
    assert len(splits.test.extra) == 20


def test_hub_dataset_unreachable_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load 'no-such/dataset-for-tests'.*pass local files with --train-file"):
        load_splits(train_file=None, validation_file=None, test_file=None, text_column="user_input",
                    label_column="toxicity", validation_fraction=0.1, seed=0, dataset="no-such/dataset-for-tests")


def test_labels_accept_bools_and_digit_strings(tmp_path):
    frame = synthetic_rows(20, 8)
    frame["toxicity"] = frame["toxicity"].map({0: "false", 1: "True"})
    splits = splits_of(write_csv(tmp_path, frame))
    assert set(splits.train.labels.tolist()) == {0, 1}
    pd.testing.assert_series_equal(pd.Series(sorted(np.concatenate([splits.train.labels, splits.validation.labels]))),
                                   pd.Series(sorted(synthetic_rows(20, 8).toxicity.tolist())))
