"""Every training source through one spec: blank labels and categories, globs, `cap=`, `max_length=`,
(prompt, response) pairs through training, and the per-source and per-task metrics."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import SAFE_TEMPLATES, TOPICS, UNSAFE_TEMPLATES, fast_training_flags
from transformers import EvalPrediction, TrainerState

from safety_classifier import training
from safety_classifier.arguments import ArgumentError
from safety_classifier.artifacts import METADATA_FILE, write_metadata
from safety_classifier.calibration import f1_maximising_threshold
from safety_classifier.categories import unsafe_verdicts
from safety_classifier.cli import parse_training_plan, train_main
from safety_classifier.data import LabelledSplit, Splits, load_splits
from safety_classifier.errors import DataError
from safety_classifier.evaluation import EpochMetrics, mixture_objective, prompt_source_auprcs, source_and_task_metrics
from safety_classifier.formatting import RESPONSE_TEMPLATE, PromptResponse, encode_pairs, encode_prompts
from safety_classifier.labels import MISSING_TARGET
from safety_classifier.modeling import load_tokenizer
from safety_classifier.sources import LOOKALIKE_SOURCES, add_sources, describe_sources, parse_source_spec
from safety_classifier.trainer import ForgetABestOfAnotherMetric, source_prior_offsets
from safety_classifier.training import tokenized_dataset

SPEC = "text=text,label=label,category=category"


def main_splits(toy_files):
    return load_splits(train_file=str(toy_files["train"]), validation_file=None, test_file=None,
                       text_column="user_input", label_column="toxicity", validation_fraction=0.2, seed=0)


def harm_rows(count: int, seed: int, *, safe_share: float = 0.3, code: str = "S9", blank_category_share: float = 0.0,
              s5_rows: int = 0) -> pd.DataFrame:
    """harm_prompts' columns: text,label,category; safe rows without a category, S5 rows without a label."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        topic = rng.choice(TOPICS)
        if index < s5_rows:
            rows.append({"text": f"Which medicine should I take for {topic}?", "label": "", "category": "S5"})
        elif rng.random() < safe_share:
            rows.append({"text": rng.choice(SAFE_TEMPLATES).format(topic), "label": "0", "category": ""})
        else:
            blank = rng.random() < blank_category_share
            rows.append({"text": rng.choice(UNSAFE_TEMPLATES).format(topic), "label": "1", "category": "" if blank else code})
    return pd.DataFrame(rows)


def response_rows(count: int, seed: int) -> pd.DataFrame:
    """PKU-SafeRLHF's columns: a harmful question, and an answer that helps (1) or refuses (0)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        topic = rng.choice(TOPICS)
        harmful = index % 2 == 0
        answer = (f"Sure, here are the steps to hurt {topic}: first get a knife." if harmful
                  else "I can't help with that, but I can suggest safer options.")
        rows.append({"prompt": rng.choice(UNSAFE_TEMPLATES).format(topic), "response": answer, "label": int(harmful)})
    return pd.DataFrame(rows)


def write(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def test_new_spec_keys_are_parsed_and_bad_values_refused():
    spec = parse_source_spec("data/*.csv,text=prompt,response=answer,label=label,cap=10,max_length=64")
    assert (spec.response_column, spec.cap, spec.max_length) == ("answer", 10, 64)
    for bad, says in [("f.csv,text=t,label=l,cap=0", "cap must be a whole number"),
                      ("f.csv,text=t,label=l,max_length=abc", "max_length must be a whole number"),
                      ("f.csv,text=t,label=l,colour=red", "colour=red")]:
        with pytest.raises(DataError, match=says):
            parse_source_spec(bad)


def test_a_blank_category_on_unsafe_rows_teaches_the_binary_decision_only(toy_files, tmp_path):
    path = write(harm_rows(60, seed=1, blank_category_share=0.5), tmp_path / "mixed.csv")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert ((frame["label"] == "1") & (frame["category"] == "")).any()
    for negatives in (False, True):
        splits, schema = add_sources(main_splits(toy_files), "train", [f"{path},{SPEC}"], seed=0,
                                     validation_fraction=0.2, safe_rows_category_negatives=negatives)
        assert schema.codes == ["S9"]
        for split in (splits.train, splits.validation):
            rows = split.sources == "mixed"
            unsafe, targets = split.labels[rows] == 1, split.categories[rows, 0]
            # Unsafe rows: a binary label each; those without a category have no category target.
            assert set(targets[unsafe].tolist()) == {1.0, MISSING_TARGET}
            # Safe rows: no category loss, or every category 0 with the negatives.
            assert (targets[~unsafe] == (0.0 if negatives else MISSING_TARGET)).all()
    # Stratified by category where present, else label: each kind keeps its share in validation.
    held_out = splits.validation.sources == "mixed"
    kinds = pd.Series([f"{label}/{target}" for label, target in zip(splits.validation.labels[held_out],
                                                                     splits.validation.categories[held_out, 0])])
    assert set(kinds) == {"0/0.0", "1/1.0", "1/-1.0"}


def test_a_blank_label_on_a_contextual_row_means_no_binary_label_and_elsewhere_follows_the_policy(toy_files, tmp_path):
    frame = harm_rows(40, seed=2, s5_rows=6)
    frame.loc[6:8, "text"] = [f"An unlabelled hateful rant, number {i}." for i in range(3)]
    frame.loc[6:8, "label"] = ""  # S9 rows without a label
    frame.loc[6:8, "category"] = "S9"
    path = write(frame, tmp_path / "catqa.csv")
    for policy, expected in (("unsafe", 1), ("unlabelled", -1), ("unsafe_except_contextual", 1)):
        splits, schema = add_sources(main_splits(toy_files), "train", [f"{path},{SPEC},validation=0.25"], seed=0,
                                     validation_fraction=0.2, category_rows_binary=policy, contextual_categories=["S5"])
        both = [(split.labels, split.categories, split.sources == "catqa") for split in (splits.train, splits.validation)]
        labels = np.concatenate([labels[rows] for labels, _, rows in both])
        targets = np.concatenate([categories[rows] for _, categories, rows in both])
        s5 = targets[:, schema.category_index("S5")] == 1
        assert s5.sum() == 6 and (labels[s5] == -1).all()  # S5: no binary label whatever the policy
        texts = [text for split in (splits.train, splits.validation)
                 for text, source in zip(split.texts, split.sources) if source == "catqa"]
        unlabelled_s9 = np.isin(texts, frame.loc[6:8, "text"].tolist()) & ~s5
        assert (labels[unlabelled_s9] == expected).all()


def test_a_safe_only_source_and_a_source_without_a_label_column_are_fine(toy_files, tmp_path):
    safe = write(harm_rows(20, seed=3, safe_share=1.0), tmp_path / "safe_only.csv")
    categories = write(harm_rows(20, seed=4, safe_share=0.0).drop(columns=["label"]), tmp_path / "no_labels.csv")
    splits, _ = add_sources(main_splits(toy_files), "train",
                            [f"{safe},{SPEC}", f"{categories},text=text,category=category"], seed=0,
                            validation_fraction=0.25, category_rows_binary="unlabelled")
    train = splits.train
    assert (train.labels[train.sources == "safe_only"] == 0).all()
    assert (train.labels[train.sources == "no_labels"] == -1).all()  # unlabelled: category loss only
    assert (train.categories[train.sources == "no_labels", 0] == 1).all()
    assert (splits.validation.sources == "safe_only").sum() == 5


def test_a_glob_spec_is_one_source_per_file_each_with_its_own_validation_split(toy_files, tmp_path):
    write(harm_rows(40, seed=5), tmp_path / "harm" / "b_second.csv")
    write(harm_rows(20, seed=6, code="S1"), tmp_path / "harm" / "a_first.csv")
    splits, schema = add_sources(main_splits(toy_files), "train", [f"{tmp_path / 'harm' / '*.csv'},{SPEC}"],
                                 seed=0, validation_fraction=0.25)
    assert list(dict.fromkeys(splits.train.sources)) == ["train", "a_first", "b_second"]
    assert schema.codes == ["S1", "S9"]
    assert [(splits.validation.sources == name).sum() for name in ("a_first", "b_second")] == [5, 10]
    with pytest.raises(DataError, match="no file matches"):
        add_sources(main_splits(toy_files), "train", [f"{tmp_path / 'nowhere' / '*.csv'},{SPEC}"], seed=0,
                    validation_fraction=0.25)


def test_cap_draws_a_stratified_sample_of_the_training_rows_after_the_validation_split(toy_files, tmp_path):
    path = write(harm_rows(80, seed=7, safe_share=0.5), tmp_path / "big.csv")
    full, _ = add_sources(main_splits(toy_files), "train", [f"{path},{SPEC},weight=2"], seed=0, validation_fraction=0.25)
    capped, _ = add_sources(main_splits(toy_files), "train", [f"{path},{SPEC},cap=20,weight=2"], seed=0,
                            validation_fraction=0.25)
    rows = lambda split: split.sources == "big"  # noqa: E731
    assert rows(capped.train).sum() == 40  # 20 rows, each twice (weight after cap)
    assert rows(capped.validation).sum() == rows(full.validation).sum() == 20  # validation drawn first
    capped_labels = capped.train.labels[rows(capped.train)]
    assert abs(capped_labels.mean() - full.train.labels[rows(full.train)].mean()) <= 0.05
    capped_texts = {text for text, source in zip(capped.train.texts, capped.train.sources) if source == "big"}
    assert capped_texts <= {text for text, source in zip(full.train.texts, full.train.sources) if source == "big"}


def test_a_sources_max_length_cuts_its_rows_and_pairs_encode_in_the_pair_template(toy_files, tmp_path, tiny_phi3):
    long_rows = harm_rows(20, seed=8)
    long_rows["text"] = long_rows["text"] + " Please answer in great detail with many many many words."
    path = write(long_rows, tmp_path / "long.csv")
    pairs = write(response_rows(24, seed=9), tmp_path / "pku.csv")
    splits, _ = add_sources(main_splits(toy_files), "train",
                            [f"{path},{SPEC},max_length=8", f"{pairs},text=prompt,response=response,label=label,validation=0.25"],
                            seed=0, validation_fraction=0.25)
    tokenizer = load_tokenizer(str(tiny_phi3))
    train = splits.train
    dataset = tokenized_dataset(train, tokenizer, 64, train.labels.tolist())
    lengths = np.asarray([len(ids) for ids in dataset["input_ids"]])
    long_source = train.sources == "long"
    assert lengths[long_source].max() == 8 and lengths[~long_source].max() > 8
    # Prompt rows: the same ids as ever; pairs: the pair template, its label the response's.
    pair_rows = train.pair_rows
    pku_rows = int((train.sources == "pku").sum())
    assert len(pair_rows) == pku_rows and 15 <= pku_rows <= 21  # a quarter of the prompts held out whole
    assert all(isinstance(train.texts[i], PromptResponse) for i in pair_rows)
    prompt_rows = np.flatnonzero(~long_source & (train.sources != "pku"))
    assert [dataset["input_ids"][i] for i in prompt_rows] == encode_prompts(tokenizer, [train.texts[i] for i in prompt_rows], 64)
    assert [dataset["input_ids"][i] for i in pair_rows] == encode_pairs(tokenizer, [train.texts[i] for i in pair_rows], 64)
    assert tokenizer.decode(dataset["input_ids"][pair_rows[0]]).startswith(RESPONSE_TEMPLATE.split("{prompt}")[0])
    lines = describe_sources(splits)
    held_out = int((splits.validation.sources == "pku").sum())
    assert any(line.startswith(f"  pku: {pku_rows} / {held_out},") and line.endswith("categories none, responses")
               for line in lines)
    assert any(line.startswith("  long: 15 / 5,") and line.endswith("max_length 8") for line in lines)


def test_the_cached_prefix_reads_each_row_as_the_uncached_path_does(toy_files, tmp_path, tiny_phi3, monkeypatch):
    """LoRA top:K caches the rows encoded by `encode_split`: a source's own max_length holds there too."""
    long_rows = harm_rows(20, seed=8)
    long_rows["text"] = long_rows["text"] + " Please answer in great detail with many many many words."
    path = write(long_rows, tmp_path / "long.csv")
    cached_ids = []
    build = training.build_cached_dataset
    monkeypatch.setattr(training, "build_cached_dataset",
                        lambda model, tokenizer, ids, *args, **kwargs: cached_ids.append(ids) or build(
                            model, tokenizer, ids, *args, **kwargs))
    flags = fast_training_flags(tiny_phi3, toy_files, tmp_path / "run", "--lora-r", "4", "--lora-layers", "top:1",
                                "--extra-train-sources", f"{path},{SPEC},max_length=8")
    assert train_main("lora", flags) == 0
    plan = parse_training_plan("lora", flags)
    splits = training.load_training_splits(plan)
    tokenizer = load_tokenizer(str(tiny_phi3))
    assert cached_ids[0] == training.encode_split(splits.train, tokenizer, plan.model.max_length)
    assert max(len(ids) for ids, source in zip(cached_ids[0], splits.train.sources) if source == "long") == 8


def test_split_seed_fixes_the_data_while_seed_varies_the_training(toy_files, tmp_path):
    """Runs with one --split-seed and different --seed hold out the same validation rows and train on the
    same sampled rows (caps, refusals), so their difference is the training's; unset, --seed draws both."""
    path = write(harm_rows(60, seed=9, safe_share=0.5), tmp_path / "harm.csv")
    answers = write(response_rows(80, seed=10), tmp_path / "answers.csv")
    sources = ["--extra-train-sources", f"{path},{SPEC},cap=20,refusals=6",
               f"{answers},text=prompt,response=response,label=label"]

    def data(*seeds: str):
        plan = parse_training_plan("lora", ["--train-file", str(toy_files["train"]), "--output-dir", str(tmp_path / "run"),
                                            *sources, *seeds])
        splits = training.load_training_splits(plan)
        return [(list(map(str, split.texts)), split.labels.tolist(), split.sources.tolist())
                for split in (splits.train, splits.validation)]

    assert data("--seed", "1", "--split-seed", "7") == data("--seed", "2", "--split-seed", "7") == data("--seed", "7")
    assert data("--seed", "1") != data("--seed", "2")
    (_, validation_8), (_, validation_7) = data("--seed", "1", "--split-seed", "8"), data("--seed", "7")
    assert validation_8 != validation_7  # another split seed, another validation split


def test_source_prior_offsets_are_each_sources_log_odds_of_unsafe_against_the_main_sources():
    sources = np.array(["main"] * 10 + ["advbench"] * 5 + ["hatecheck"] * 5 + ["refusals"] * 3 + ["ailuminate"] * 2
                       + ["benign"] * 2, dtype=object)
    labels = np.array([1, 1] + [0] * 8 + [1] * 5 + [1, 1, 0, 0, -1] + [0] * 3 + [-1] * 2 + [0] * 2)
    train = LabelledSplit("train", [f"t{i}" for i in range(27)], labels, pd.DataFrame(index=range(27)), sources=sources)
    splits = Splits(train, train, None, main_source="main")
    main = np.log(0.2 / 0.8)
    offsets = source_prior_offsets(splits, 1.0)
    # All unsafe counts as 95 % unsafe, all safe as 5 %; a row without a binary label counts in neither,
    # and a source without any (category rows only) gets no offset; nor do the refusals, safe by construction.
    expected = {"main": 0.0, "advbench": np.log(0.95 / 0.05) - main, "hatecheck": -main, "benign": np.log(0.05 / 0.95) - main}
    assert offsets == pytest.approx(expected, abs=1e-4) and list(offsets) == list(expected)
    assert source_prior_offsets(splits, 0.5) == pytest.approx({k: v / 2 for k, v in expected.items()}, abs=1e-4)
    assert source_prior_offsets(splits, 0.0) == {}
    labelled = training.training_labels(train, offsets=offsets)
    assert [row[-1] for row in labelled] == pytest.approx([offsets.get(source, 0.0) for source in sources], abs=1e-6)
    assert [int(row[0]) for row in labelled] == labels.tolist()


def test_source_prior_offsets_reach_the_loss_cached_or_not_and_validation_has_none(toy_files, tmp_path, tiny_phi3):
    path = write(harm_rows(40, seed=9, safe_share=0.0), tmp_path / "advbench.csv")
    for layers in ("top:1", "all"):  # the cached prefix's collator, and token ids padded per batch
        flags = fast_training_flags(tiny_phi3, toy_files, tmp_path / "run", "--extra-train-sources", f"{path},{SPEC}",
                                    "--source-prior-offsets", "0.5", "--lora-r", "4", "--lora-layers", layers)
        plan = parse_training_plan("lora", flags)
        splits = training.load_training_splits(plan)
        session = training.build_training_session(plan, splits)
        main_share = splits.train.labels[splits.train.sources == "train"].mean()
        advbench = 0.5 * (np.log(0.95 / 0.05) - np.log(main_share / (1 - main_share)))
        assert session.source_offsets == pytest.approx({"train": 0.0, "advbench": advbench}, abs=1e-4)
        trainer = session.trainer
        batches = list(trainer.get_train_dataloader())
        assert {batch["labels"].shape[1] for batch in batches} == {2 + len(splits.schema.codes)}  # binary, categories, offset
        offsets = np.concatenate([batch["labels"][:, -1].numpy() for batch in batches])
        assert sorted(set(np.round(offsets, 3).tolist())) == pytest.approx([0.0, advbench], abs=1e-3)
        assert next(iter(trainer.get_eval_dataloader()))["labels"].shape[1] == 1 + len(splits.schema.codes)
        assert "source prior offsets (unsafe logit, training only): train +0.00, advbench +" in session.describe(plan, splits)[-2]
    with pytest.raises(ArgumentError, match="needs --extra-train-sources"):
        parse_training_plan("lora", ["--train-file", str(toy_files["train"]), "--source-prior-offsets", "1"])
    with pytest.raises(ArgumentError, match="between 0 and 1"):
        parse_training_plan("lora", flags[:-2] + ["--source-prior-offsets", "1.5"])


def test_source_metrics_rank_an_all_unsafe_source_against_the_main_sources_safe_rows():
    sources = np.array(["main"] * 4 + ["advbench"] * 2 + ["hatecheck"] * 4, dtype=object)
    labels = np.array([0, 0, 1, 1, 1, 1, 0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.7, 0.9, 0.8, 0.3, 0.7, 0.2, 0.9, 0.4])
    split = LabelledSplit("validation", [f"t{i}" for i in range(10)], labels, pd.DataFrame(index=range(10)),
                          sources=sources)
    metrics = source_and_task_metrics(split, scores, 0.5, scores >= 0.5, "main")
    advbench = metrics["sources"]["advbench"]
    # Its two rows (0.8, 0.3) ranked with the main source's safe rows (0.1, 0.6): AP = (1 + 2/3) / 2.
    assert advbench["auprc"] == pytest.approx(5 / 6) and advbench["auprc_against"] == "main"
    assert advbench["recall"] == 0.5 and advbench["fpr"] is None and advbench["unsafe_share"] == 1.0
    assert metrics["sources"]["hatecheck"]["fpr"] == 0.5 and "auprc_against" not in metrics["sources"]["hatecheck"]
    assert metrics["lookalike_fpr"] == 0.5 and metrics["lookalike_n"] == 2 and metrics["lookalike_sources"] == ["hatecheck"]
    assert metrics["source_macro_auprc"] == pytest.approx(np.mean([entry["auprc"] for entry in metrics["sources"].values()]))
    assert "hatecheck" in LOOKALIKE_SOURCES


def test_the_format_version_of_a_classifier_that_judges_responses_is_7(tmp_path):
    write_metadata(tmp_path, {"responses": True, "prompt_template": "{text}"})
    assert json.loads((tmp_path / METADATA_FILE).read_text())["format_version"] == 7
    write_metadata(tmp_path, {"prompt_template": "{text}"})
    assert json.loads((tmp_path / METADATA_FILE).read_text())["format_version"] == 6


@pytest.mark.parametrize("content, extra, says", [
    ("text,label,category\nhello,1,S9\nworld,,\n", "", r"bad\.csv: row\(s\) 2 have neither a label \(column 'label'\) "
                                                      r"nor a category \(column 'category'\)"),
    ("text,label,category\nhello,1,S9\nworld,0,S9\n", "", r"bad\.csv: row\(s\) 2 are safe .* carry category 'S9'"),
    ("text,label,category\nhello,1,S9\nworld,maybe,\n", "", r"bad\.csv: column 'label' must hold 0 \(safe\), 1 "
                                                           r"\(unsafe\) or nothing; row\(s\) 2"),
    ("prompt,label\nhello,1\n", ",response=answer", r"bad\.csv: no column 'answer' \(set response= "),
    ("prompt,answer,label\nhello,hi,1\nagain,there,1\nmore,words,1\nstill,more,1\n", ",response=answer",
     r"validation rows of the response source\(s\) bad need both safe \(0\) and unsafe \(1\) rows"),
])
def test_bad_source_data_is_refused_before_any_model_is_loaded(toy_files, tmp_path, capsys, content, extra, says):
    (tmp_path / "bad.csv").write_text(content)
    text = "prompt" if "prompt" in content else "text"
    spec = f"{tmp_path / 'bad.csv'},text={text},label=label{',category=category' if 'category' in content else ''}"
    flags = ["--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out"),
             "--train-file", str(toy_files["train"]), "--extra-train-sources", spec + extra + ",validation=0.5"]
    assert train_main("lora", flags) == 2
    error = capsys.readouterr().err
    assert re.search(says, error), error
    assert "no-such-model" not in error


@pytest.fixture(scope="module")
def responses_run(tiny_phi3, toy_files, tmp_path_factory) -> tuple[Path, str]:
    """One short run on the main toy file, a look-alike source, an all-unsafe source whose rows
    have a category or none (and refusals to some of them), and a response source."""
    directory = tmp_path_factory.mktemp("sources-run")
    hatecheck = write(harm_rows(40, seed=10, safe_share=0.5), directory / "hatecheck.csv")
    advbench = write(harm_rows(20, seed=11, safe_share=0.0, code="S1", blank_category_share=0.5),
                     directory / "advbench.csv")
    pku = write(response_rows(40, seed=12), directory / "pku.csv")
    output_dir = directory / "out"
    flags = fast_training_flags(tiny_phi3, toy_files, output_dir, "--lora-r", "4", "--extra-train-sources",
                                f"{hatecheck},{SPEC},validation=0.25", f"{advbench},{SPEC},validation=0.25,refusals=6",
                                f"{pku},text=prompt,response=response,label=label,validation=0.25")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_main("lora", flags) == 0
    return output_dir, out.getvalue()


def test_a_response_source_trains_end_to_end_with_its_own_threshold_and_metrics(responses_run):
    output_dir, printed = responses_run
    metadata = json.loads((output_dir / METADATA_FILE).read_text())
    assert metadata["responses"] is True and metadata["response_template"] == RESPONSE_TEMPLATE
    assert metadata["format_version"] == 7
    responses = json.loads((output_dir / "metrics.json").read_text())["validation"]["responses"]
    assert metadata["response_threshold"] == responses["threshold"]
    predictions = pd.read_csv(output_dir / "validation_predictions.csv", keep_default_na=False)
    pairs = predictions[predictions["source"] == "pku"]
    # A quarter of the prompts held out whole (so about a quarter of the rows), both classes among them.
    assert responses["n"] == len(pairs) and 6 <= len(pairs) <= 14
    assert responses["unsafe_share"] == pytest.approx(pairs["label"].mean()) and 0 < responses["unsafe_share"] < 1
    assert "response" not in predictions.columns and "text" not in predictions.columns  # no text, as before
    assert responses["threshold"] == pytest.approx(
        f1_maximising_threshold(pairs["label"], pairs["unsafe_probability"]), abs=1e-5)
    called = pairs["unsafe_probability"] >= responses["threshold"] - 1e-6
    assert responses["fpr"] == pytest.approx(called[pairs["label"] == 0].mean())
    # The refusals to advbench's validation prompts are measured apart, at the same threshold.
    refusals = predictions[predictions["source"] == "refusals"]
    assert responses["refusal_n"] == len(refusals) == 3 and (refusals["label"] == 0).all()
    assert responses["refusal_fpr"] == pytest.approx((refusals["unsafe_probability"] >= responses["threshold"]).mean())
    assert "refusals (3 validation pairs, wordings not trained on): judged unsafe" in printed
    assert {"auprc", "f1", "recall", "at_decision_threshold"} <= set(responses)
    assert f"responses ({len(pairs)} validation pairs): AUPRC" in printed


def test_per_source_startup_lines_and_metrics_with_the_lookalike_fpr(responses_run):
    output_dir, printed = responses_run
    assert "  train (main): 108 / 12, " in printed
    assert "  hatecheck: 30 / 10, " in printed and ", categories S9" in printed
    assert "  advbench: 15 / 5, 100.0% unsafe, categories S1" in printed
    metrics = json.loads((output_dir / "metrics.json").read_text())
    held_out = metrics["validation"]["responses"]["n"]  # whole prompts held out, so not exactly 10
    assert re.search(rf"  pku: {40 - held_out} / {held_out}, \d+\.\d% unsafe, categories none, responses", printed)
    validation = metrics["validation"]
    assert set(validation["sources"]) == {"train", "hatecheck", "advbench", "pku", "refusals"}
    assert "  refusals: 6 / 3, 0.0% unsafe, categories none, responses" in printed
    assert validation["sources"]["advbench"]["auprc_against"] == "train"
    assert validation["sources"]["pku"]["responses"] is True
    metadata = json.loads((output_dir / METADATA_FILE).read_text())
    predictions = pd.read_csv(output_dir / "validation_predictions.csv", keep_default_na=False)
    verdicts = unsafe_verdicts(predictions["unsafe_probability"].to_numpy(),
                               predictions[["score_S1", "score_S9"]].to_numpy(),
                               metadata["threshold"], metadata.get("category_route_threshold"))
    lookalike = ((predictions["source"] == "hatecheck") & (predictions["label"] == 0)).to_numpy()
    assert validation["lookalike_n"] == lookalike.sum() > 0
    assert validation["lookalike_fpr"] == pytest.approx(verdicts[lookalike].mean())
    prompt_sources = [entry["auprc"] for name, entry in validation["sources"].items()
                      if name not in ("pku", "refusals")]
    assert validation["source_macro_auprc"] == pytest.approx(np.mean([a for a in prompt_sources if a is not None]))
    assert "look-alike FPR" in printed and "source macro AUPRC" in printed
    assert metrics["test"]["n"] == 40  # the test file stays the main source's
    # Unsafe rows without a category count in the binary metrics, not in the category ones.
    advbench = predictions[predictions["source"] == "advbench"]
    assert validation["sources"]["advbench"]["n"] == len(advbench) == 5 and (advbench["category"] == "").any()
    assert validation["categories"]["n"] == int((predictions["category"] != "").sum())


def test_each_epoch_measures_every_source_and_keeps_its_checkpoint_on_the_mixture_objective(responses_run):
    """The epoch's per-source AUPRCs, measured on predictions the Trainer reordered by length, are
    those metrics.json measures on the saved classifier (one epoch: the kept one)."""
    output_dir, printed = responses_run
    validation = json.loads((output_dir / "metrics.json").read_text())["validation"]
    (epoch,) = json.loads((output_dir / "validation_history.json").read_text())
    assert set(epoch["source_auprc"]) == {name for name, entry in validation["sources"].items()
                                          if entry["auprc"] is not None and not entry["responses"]}
    for name, value in epoch["source_auprc"].items():
        assert value == pytest.approx(validation["sources"][name]["auprc"], abs=1e-6), name
    assert epoch["source_macro_auprc"] == pytest.approx(validation["source_macro_auprc"], abs=1e-6)
    assert epoch["mixture_objective"] == pytest.approx(
        mixture_objective(validation["sources"]["train"]["auprc"], validation["source_macro_auprc"]), abs=1e-6)
    assert "(the best epoch on it is kept)" in printed


def test_epoch_metrics_follow_the_loaders_row_order_and_refuse_another(toy_files):
    rng = np.random.default_rng(0)
    sources = np.array(["main"] * 6 + ["advbench"] * 3 + ["hatecheck"] * 4 + ["extra"] * 2, dtype=object)
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1, -1, 1])
    validation = LabelledSplit("validation", [f"t{i}" for i in range(15)], labels, pd.DataFrame(index=range(15)),
                               sources=sources)
    splits = Splits(main_splits(toy_files).train, validation, None, main_source="main")
    margins = rng.normal(size=15)
    order = rng.permutation(15)
    epoch_metrics = EpochMetrics(splits, row_order=lambda: order)
    main_labels = np.where(sources == "main", labels, -1)
    prediction = lambda rows: EvalPrediction(np.column_stack([-margins[rows] / 2, margins[rows] / 2]),  # noqa: E731
                                             main_labels[rows])
    metrics = epoch_metrics(prediction(order))
    binary = validation.subset(validation.binary_rows)
    expected = prompt_source_auprcs(binary, margins[validation.binary_rows], "main")
    assert set(expected) == {"main", "advbench", "hatecheck", "extra"}
    assert {name: metrics[f"auprc:{name}"] for name in expected} == pytest.approx(expected)
    assert metrics["auprc"] == pytest.approx(expected["main"])
    assert metrics["mixture_objective"] == pytest.approx((expected["main"] + np.mean(list(expected.values()))) / 2)
    assert EpochMetrics.best_metric(splits) == "mixture_objective"
    assert EpochMetrics.best_metric(main_splits(toy_files)) == "auprc"
    with pytest.raises(RuntimeError, match="order"):
        epoch_metrics(prediction(np.roll(order, 1)))
    # Predictions of other rows (Trainer.predict, evaluate on another set) come without an order.
    assert "mixture_objective" not in EpochMetrics(splits, row_order=lambda: None)(prediction(order))


def test_a_resumed_best_of_another_metric_is_forgotten():
    """A checkpoint kept on AUPRC before the mixture objective existed must not stand against it."""
    args = SimpleNamespace(metric_for_best_model="mixture_objective")
    before = TrainerState(best_metric=0.9, best_model_checkpoint="checkpoint-1",
                          log_history=[{"eval_auprc": 0.9, "epoch": 1.0}])
    ForgetABestOfAnotherMetric().on_train_begin(args, before, None)
    assert before.best_metric is None and before.best_model_checkpoint is None
    kept = TrainerState(best_metric=0.8, best_model_checkpoint="checkpoint-1",
                        log_history=[{"eval_auprc": 0.7, "eval_mixture_objective": 0.8, "epoch": 1.0}])
    ForgetABestOfAnotherMetric().on_train_begin(args, kept, None)
    assert kept.best_metric == 0.8 and kept.best_model_checkpoint == "checkpoint-1"


def test_a_list_file_of_specs_reads_as_the_specs_given_one_by_one(toy_files, tmp_path):
    path = write(harm_rows(20, seed=3), tmp_path / "hate.csv")
    listed = tmp_path / "sources.txt"
    listed.write_text(f"# the mixture\n\n{path},{SPEC},cap=10\n")
    given, _ = add_sources(main_splits(toy_files), "train", [f"{path},{SPEC},cap=10"], seed=0, validation_fraction=0.25)
    read, _ = add_sources(main_splits(toy_files), "train", [f"@{listed}"], seed=0, validation_fraction=0.25)
    assert read.train.texts == given.train.texts and read.validation.texts == given.validation.texts
    with pytest.raises(DataError, match="training sources file"):
        add_sources(main_splits(toy_files), "train", [f"@{tmp_path / 'missing.txt'}"], seed=0, validation_fraction=0.25)


def test_a_response_source_holds_out_whole_prompts(toy_files, tmp_path):
    """Several answers to one prompt: validation never grades answers to a prompt seen in training."""
    rows = response_rows(60, seed=4)
    assert rows["prompt"].duplicated().any()
    pairs = write(rows, tmp_path / "pku.csv")
    spec = f"{pairs},text=prompt,response=response,label=label,validation=0.3"
    splits, _ = add_sources(main_splits(toy_files), "train", [spec], seed=0, validation_fraction=0.25)
    prompts = {name: {text.prompt for text in split.texts if isinstance(text, PromptResponse)}
               for name, split in (("train", splits.train), ("validation", splits.validation))}
    assert prompts["train"] and prompts["validation"] and not prompts["train"] & prompts["validation"]
    assert sum(isinstance(text, PromptResponse) for text in splits.train.texts + splits.validation.texts) == 60
