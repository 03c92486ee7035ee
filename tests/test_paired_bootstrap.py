"""experiments/paired_bootstrap.py: two runs' validation figures compared on the same resampled rows."""

from __future__ import annotations

import dataclasses
import json

import lookalike_threshold
import numpy as np
import paired_bootstrap
import pandas as pd
import pytest

from safety_classifier.data import LabelledSplit
from safety_classifier.evaluation import source_and_task_metrics
from safety_classifier.formatting import PromptResponse

MAIN = "chat_train"


def validation_rows(seed: int = 0) -> pd.DataFrame:
    """The labelled validation rows of a run over several sources: the main source (both classes), a
    look-alike source (both), a source of unsafe prompts only, an answers source, and category rows
    without a binary label (which the comparison leaves out, as evaluation.py does)."""
    rng = np.random.default_rng(seed)
    labels = {MAIN: [0] * 60 + [1] * 20, "hatecheck": [0] * 30 + [1] * 30, "advbench": [1] * 25,
              "pku_saferlhf": [0] * 30 + [1] * 30, "ailuminate": [-1] * 10}
    frame = pd.DataFrame([(source, label) for source, values in labels.items() for label in values],
                         columns=["source", "label"])
    frame.insert(0, "row", np.arange(len(frame)))
    frame["category"] = ""
    frame["noise"] = rng.random(len(frame))
    return frame


def write_run(run_dir, frame: pd.DataFrame, scores: np.ndarray, threshold: float = 0.5) -> None:
    run_dir.mkdir(parents=True)
    frame.drop(columns="noise").assign(unsafe_probability=scores, score_S1=scores / 2).to_csv(
        run_dir / "validation_predictions.csv", index=False)
    (run_dir / "safety_classifier.json").write_text(json.dumps({
        "threshold": threshold, "category_route_threshold": None, "categories": [{"code": "S1", "threshold": 0.3}],
        "training_arguments": {"train_file": f"data/{MAIN}.csv"}}))
    sources = {name: {"responses": name == "pku_saferlhf"} for name in dict.fromkeys(frame["source"])}
    (run_dir / "metrics.json").write_text(json.dumps({"validation": {"sources": sources}}))


def scores_of(frame: pd.DataFrame, separation: float) -> np.ndarray:
    """Scores that rank unsafe rows above safe ones by `separation` on top of shared noise."""
    return np.clip(0.5 * frame["noise"].to_numpy() + separation * (frame["label"].to_numpy() == 1), 0, 1)


@pytest.fixture
def two_runs(tmp_path):
    frame = validation_rows()
    write_run(tmp_path / "a", frame, scores_of(frame, 0.1))
    write_run(tmp_path / "b", frame, scores_of(frame, 0.5))
    return tmp_path / "a", tmp_path / "b", frame


def test_the_figures_on_all_rows_are_those_evaluation_reports(two_runs):
    run_a, _, frame = two_runs
    run = paired_bootstrap.ScoredRun.read(run_a)
    figures = run.figures(np.arange(len(run.rows)))
    labelled = frame[frame["label"] >= 0].reset_index(drop=True)
    scores = scores_of(labelled, 0.1)
    texts = [PromptResponse("q", "a") if source == "pku_saferlhf" else "q" for source in labelled["source"]]
    split = LabelledSplit("validation", texts, labelled["label"].to_numpy(), pd.DataFrame(index=labelled.index),
                          sources=labelled["source"].to_numpy())
    reported = source_and_task_metrics(split, scores, 0.5, scores >= 0.5, MAIN)
    for name, entry in reported["sources"].items():
        assert figures[f"{name} AUPRC"] == pytest.approx(entry["auprc"])
    assert reported["sources"]["advbench"]["auprc_against"] == MAIN  # unsafe only: ranked against the main safe rows
    assert figures[paired_bootstrap.MACRO] == pytest.approx(reported["source_macro_auprc"])
    assert figures[paired_bootstrap.LOOKALIKE] == pytest.approx(reported["lookalike_fpr"])
    assert "ailuminate AUPRC" not in figures  # no binary label: not compared


def test_a_run_against_itself_differs_by_nothing(two_runs):
    run_a, _, _ = two_runs
    run = paired_bootstrap.ScoredRun.read(run_a)
    table = paired_bootstrap.paired_bootstrap(run, run, resamples=50)
    assert table and all(entry["difference"] == 0 and entry["low"] == entry["high"] == 0 and not entry["clear"]
                         for entry in table)


def test_a_clearly_better_ranking_is_told_from_noise_and_a_small_one_is_not(two_runs, tmp_path):
    run_a, run_b, frame = two_runs
    a, b = paired_bootstrap.ScoredRun.read(run_a), paired_bootstrap.ScoredRun.read(run_b)
    table = {entry["figure"]: entry for entry in paired_bootstrap.paired_bootstrap(a, b, resamples=200, seed=3)}
    main = table[f"{MAIN} AUPRC"]
    assert main["difference"] > 0 and main["low"] > 0 and main["clear"] and main["low"] <= main["difference"] <= main["high"]
    assert table[paired_bootstrap.MACRO]["clear"]
    # the same draws give the same table
    assert paired_bootstrap.paired_bootstrap(a, b, resamples=200, seed=3) == list(table.values())
    write_run(tmp_path / "c", frame, scores_of(frame, 0.1) + 1e-3 * (frame["row"].to_numpy() % 3))
    slightly = paired_bootstrap.ScoredRun.read(tmp_path / "c")
    nudged = {entry["figure"]: entry for entry in paired_bootstrap.paired_bootstrap(a, slightly, resamples=200)}
    assert not nudged[f"{MAIN} AUPRC"]["clear"] and nudged[f"{MAIN} AUPRC"]["low"] < 0 < nudged[f"{MAIN} AUPRC"]["high"]


def test_several_runs_a_side_compare_their_means_and_report_their_spread(two_runs, tmp_path, capsys):
    run_a, run_b, frame = two_runs
    write_run(tmp_path / "a2", frame, scores_of(frame, 0.2))  # A's recipe at another seed: a little better
    a, b, a2 = (paired_bootstrap.ScoredRun.read(path) for path in (run_a, run_b, tmp_path / "a2"))
    single = paired_bootstrap.paired_bootstrap(a, b, resamples=100, seed=5)
    doubled = paired_bootstrap.paired_bootstrap([a, a], [b, b], resamples=100, seed=5)
    assert [{**entry, "a_spread": 0.0, "b_spread": 0.0} for entry in single] == doubled
    everything = np.arange(len(a.rows))
    main = f"{MAIN} AUPRC"
    pooled = {entry["figure"]: entry for entry in paired_bootstrap.paired_bootstrap([a, a2], [b], resamples=100)}[main]
    one, two = a.figures(everything)[main], a2.figures(everything)[main]
    assert two > one and pooled["a"] == pytest.approx((one + two) / 2) and pooled["a_spread"] == pytest.approx(two - one)
    assert pooled["b_spread"] == 0 and pooled["difference"] == pytest.approx(pooled["b"] - pooled["a"])
    paired_bootstrap.main([str(run_a), str(tmp_path / "a2"), "--versus", str(run_b), "--resamples", "20",
                           "--json", str(tmp_path / "ab.json")])
    printed = capsys.readouterr().out
    assert "the mean of 2 runs" in printed and "spread A / B" in printed
    written = json.loads((tmp_path / "ab.json").read_text())
    assert written["a"] == [str(run_a), str(tmp_path / "a2")] and written["b"] == [str(run_b)]
    other = frame.sample(frac=1.0, random_state=2).reset_index(drop=True)
    write_run(tmp_path / "other", other, scores_of(other, 0.3))
    with pytest.raises(SystemExit, match="scored different validation rows"):
        paired_bootstrap.paired_bootstrap([a, paired_bootstrap.ScoredRun.read(tmp_path / "other")], [b], resamples=5)
    with pytest.raises(SystemExit):
        paired_bootstrap.main([str(run_a), str(run_b), str(tmp_path / "a2")])  # three runs need --versus


def test_runs_over_other_rows_are_refused(two_runs, tmp_path):
    run_a, _, frame = two_runs
    other = frame.sample(frac=1.0, random_state=1).reset_index(drop=True)
    write_run(tmp_path / "other", other, scores_of(other, 0.3))
    with pytest.raises(SystemExit, match="scored different validation rows"):
        paired_bootstrap.paired_bootstrap(paired_bootstrap.ScoredRun.read(run_a),
                                          paired_bootstrap.ScoredRun.read(tmp_path / "other"), resamples=5)
    with pytest.raises(SystemExit, match="not a finished training run"):
        paired_bootstrap.ScoredRun.read(tmp_path / "missing")
    write_run(tmp_path / "hub", frame, scores_of(frame, 0.3))  # trained on a hub dataset: no main source's file
    (tmp_path / "hub" / "safety_classifier.json").write_text(json.dumps({"threshold": 0.5, "training_arguments": {}}))
    with pytest.raises(SystemExit, match="main source is not known"):
        paired_bootstrap.ScoredRun.read(tmp_path / "hub")


def test_the_command_prints_the_table_and_writes_it(two_runs, tmp_path, capsys):
    run_a, run_b, _ = two_runs
    paired_bootstrap.main([str(run_a), str(run_b), "--resamples", "30", "--json", str(tmp_path / "out" / "ab.json")])
    printed = capsys.readouterr().out
    assert f"{MAIN} AUPRC" in printed and "look-alike FPR" in printed and "paired-bootstrap interval" in printed
    written = json.loads((tmp_path / "out" / "ab.json").read_text())
    assert written["resamples"] == 30 and {entry["figure"] for entry in written["figures"]} >= {paired_bootstrap.MACRO}
    with pytest.raises(SystemExit):
        paired_bootstrap.main([str(run_a), str(run_b), "--resamples", "0"])


def test_the_lookalike_threshold_table_measures_the_verdicts_at_each_threshold(two_runs, capsys):
    _, run_b, frame = two_runs
    run = paired_bootstrap.ScoredRun.read(run_b)
    scores = scores_of(frame, 0.5)
    safe_hatecheck = ((frame["source"] == "hatecheck") & (frame["label"] == 0)).to_numpy()
    main = (frame["source"] == MAIN).to_numpy()
    for threshold in (0.3, 0.6):
        row = lookalike_threshold.threshold_row(run, threshold)
        called = scores >= threshold
        assert row["lookalike_fpr"] == pytest.approx(called[safe_hatecheck].mean()) and row["lookalike_n"] == 30
        assert row["by_source"] == {"hatecheck": pytest.approx(called[safe_hatecheck].mean())}
        assert row["main_recall"] == pytest.approx(called[main & (frame["label"] == 1).to_numpy()].mean())
    assert lookalike_threshold.main([str(run_b), "--thresholds", "0.3,0.6", "--target-fpr", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "| 0.500 (stored) |" in printed and "| 0.300 |" in printed and "look-alike FPR <= 0.1 from" in printed
    with pytest.raises(SystemExit):
        lookalike_threshold.main([str(run_b), "--thresholds", "0.3,high"])
    assert "--thresholds takes numbers" in capsys.readouterr().err


def test_the_lowest_threshold_for_a_lookalike_fpr_is_the_lowest(two_runs):
    run = paired_bootstrap.ScoredRun.read(two_runs[1])
    safe_hatecheck = ((run.rows["source"] == "hatecheck") & (run.rows["label"] == 0)).to_numpy()
    for target in (0.0, 0.1, 0.5):
        threshold = lookalike_threshold.lowest_threshold_for(run, target)
        fpr = lambda value: run.verdicts_at(value)[safe_hatecheck].mean()  # noqa: E731
        assert fpr(threshold) <= target < fpr(np.nextafter(threshold, -np.inf))
    # A route that flags every row leaves no threshold that reaches any target.
    assert lookalike_threshold.lowest_threshold_for(dataclasses.replace(run, route_threshold=0.0), 0.5) is None
