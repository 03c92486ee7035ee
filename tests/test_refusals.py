"""`refusals=N`: refusals to a prompt source's unsafe prompts, as safe answers of the response task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT
from test_sources import SPEC, harm_rows, main_splits, response_rows, write

from safety_classifier.data import LabelledSplit
from safety_classifier.errors import DataError
from safety_classifier.evaluation import response_metrics
from safety_classifier.formatting import PromptResponse
from safety_classifier.labels import MISSING_TARGET
from safety_classifier.refusals import REFUSALS, refusal_wordings
from safety_classifier.sources import add_sources, parse_source_spec

MAKEFILE = REPO_ROOT / "Makefile"


def test_the_spec_key_is_parsed_and_refused_on_a_source_with_answers():
    assert parse_source_spec("f.csv,text=t,label=l,refusals=40").refusals == 40
    with pytest.raises(DataError, match="refusals must be a whole number"):
        parse_source_spec("f.csv,text=t,label=l,refusals=-1")
    with pytest.raises(DataError, match="has answers of its own"):
        parse_source_spec("f.csv,text=t,response=r,label=l,refusals=4")


def test_held_out_wordings_are_kept_from_training():
    trained, held_out = set(refusal_wordings(False)), set(refusal_wordings(True))
    assert trained and held_out and not trained & held_out and trained | held_out == set(REFUSALS)
    # make demo's example refusal is one the classifier is never trained on.
    assert "I can't help with that." in held_out and "--responses \"I can't help with that.\"" in MAKEFILE.read_text()


def unique_harm_rows(count: int, seed: int) -> pd.DataFrame:
    rows = harm_rows(count, seed, safe_share=0.3)
    rows["text"] = [f"{text} (case {index})" for index, text in enumerate(rows["text"])]
    return rows


PKU_SPEC = "text=prompt,response=response,label=label,validation=0.25"


@pytest.mark.parametrize("negatives", [False, True])
def test_refusals_pair_unsafe_prompts_of_each_side_with_that_sides_wordings(toy_files, tmp_path, negatives):
    harm = write(unique_harm_rows(80, seed=1), tmp_path / "harm.csv")
    pku = write(response_rows(40, seed=2), tmp_path / "pku.csv")
    specs = [f"{harm},{SPEC},validation=0.25,refusals=10,max_length=32", f"{pku},{PKU_SPEC}"]
    splits, schema = add_sources(main_splits(toy_files), "train", specs, seed=0, validation_fraction=0.25,
                                 safe_rows_category_negatives=negatives)
    for split, count, wordings in ((splits.train, 10, refusal_wordings(False)), (splits.validation, 5, refusal_wordings(True))):
        rows = np.flatnonzero(split.sources == "refusals")
        unsafe_prompts = {text for text, label, source in zip(split.texts, split.labels, split.sources)
                          if source == "harm" and label == 1}
        pairs = [split.texts[i] for i in rows]
        assert len(pairs) == count and all(isinstance(pair, PromptResponse) for pair in pairs)
        assert {pair.prompt for pair in pairs} <= unsafe_prompts  # the same side's prompts: none crosses over
        assert {pair.response for pair in pairs} <= set(wordings)
        assert (split.labels[rows] == 0).all() and (split.max_lengths[rows] == 32).all()
        # A refusal names no harm: no category loss, or every category 0 as for the other safe rows.
        assert (split.categories[rows] == (0.0 if negatives else MISSING_TARGET)).all()
    again, _ = add_sources(main_splits(toy_files), "train", specs, seed=0, validation_fraction=0.25,
                           safe_rows_category_negatives=negatives)
    assert again.train.texts == splits.train.texts  # seeded


def test_a_source_with_fewer_unsafe_prompts_than_asked_gives_what_it_has_and_says_so(toy_files, tmp_path):
    harm = write(unique_harm_rows(20, seed=5), tmp_path / "harm.csv")
    pku = write(response_rows(40, seed=2), tmp_path / "pku.csv")
    with pytest.warns(UserWarning, match="refusals=50, but its training rows hold only"):
        splits, _ = add_sources(main_splits(toy_files), "train", [f"{harm},{SPEC},refusals=50", f"{pku},{PKU_SPEC}"],
                                seed=0, validation_fraction=0.25)
    unsafe = sum(label == 1 for label, source in zip(splits.train.labels, splits.train.sources) if source == "harm")
    assert (splits.train.sources == "refusals").sum() == unsafe


@pytest.mark.parametrize("refusals", [1, 4])  # refusals=1 holds out no validation pair at all
def test_refusals_without_a_response_source_are_refused(toy_files, tmp_path, refusals):
    harm = write(harm_rows(40, seed=3, safe_share=0.0), tmp_path / "harm.csv")
    with pytest.raises(DataError, match="needs a response source"):
        add_sources(main_splits(toy_files), "train", [f"{harm},{SPEC},refusals={refusals}"], seed=0,
                    validation_fraction=0.25)


def test_a_source_may_not_take_the_name_of_the_generated_refusals(toy_files, tmp_path):
    pku = write(response_rows(40, seed=2), tmp_path / "refusals.csv")
    with pytest.raises(DataError, match="rename its file"):
        add_sources(main_splits(toy_files), "train", [f"{pku},{PKU_SPEC}"], seed=0, validation_fraction=0.25)


def test_the_response_threshold_and_metrics_leave_the_refusals_out():
    pairs = [PromptResponse(f"q{i}", f"a{i}") for i in range(9)]
    sources = np.array(["pku"] * 6 + ["refusals"] * 3, dtype=object)
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.65, 0.62, 0.05])
    split = LabelledSplit("validation", pairs, labels, pd.DataFrame(index=range(9)), sources=sources)
    threshold, metrics = response_metrics(split, scores, scores >= 0.5)
    # The pku rows alone separate at 0.6; with the refusals (0.65, 0.62) counted in, it would move to 0.7.
    assert threshold == pytest.approx(0.6) and metrics["n"] == 6 and metrics["auprc"] == 1.0
    assert metrics["refusal_n"] == 3 and metrics["refusal_fpr"] == pytest.approx(2 / 3)
    without_refusals = split.subset(np.arange(6))
    _, metrics = response_metrics(without_refusals, scores[:6], scores[:6] >= 0.5)
    assert metrics["refusal_n"] == 0 and metrics["refusal_fpr"] is None
