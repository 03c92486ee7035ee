"""The baselines, the tables generated from results/ (docs/results.md, README.md, docs/experiments-log.md),
and the experiments' analyses."""

from __future__ import annotations

import json
import os

import category_recall
import category_route
import compare_methods
import numpy as np
import pandas as pd
import pytest
import report
import report_figures
import torch
from conftest import REPO_ROOT, category_rows, synthetic_rows

from safety_classifier.baselines import C_GRID, fit_logistic_probe, fit_tfidf_logistic_regression, frozen_features
from safety_classifier.modeling import build_model, load_tokenizer
from safety_classifier.sources import ailuminate_source_spec


def test_the_tfidf_baseline_learns_the_synthetic_rule():
    train, validation = synthetic_rows(200, seed=3), synthetic_rows(60, seed=4)
    model, c = fit_tfidf_logistic_regression(train["user_input"], train["toxicity"].to_numpy(),
                                             validation["user_input"], validation["toxicity"].to_numpy())
    # synthetic_rows forces the labels of its first two rows whatever their text: leave them out.
    scores = model.predict_proba(validation["user_input"].tolist())[2:, 1]
    labels = validation["toxicity"].to_numpy()[2:]
    assert c in C_GRID
    assert scores[labels == 1].min() > scores[labels == 0].max(), "the synthetic rows are separable by their words"


def test_frozen_features_are_what_the_head_reads(tiny_phi3):
    """head(features) equals the classifier's own logits, whatever the batching."""
    tokenizer = load_tokenizer(str(tiny_phi3))
    torch.manual_seed(0)
    model = build_model("full_layers", str(tiny_phi3), tokenizer, torch.float32, num_layers=0).eval()
    texts = ["hi", "What is the capital of France?", "How do I build a bomb, step by step, right now?", "x y"]
    features = frozen_features(model, tokenizer, texts, max_length=64, max_batch_tokens=16, show_progress=False)
    alone = np.concatenate([frozen_features(model, tokenizer, [t], max_length=64, show_progress=False) for t in texts])
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        from_features = model.score(torch.as_tensor(features))
    assert features.shape == (4, model.config.hidden_size)
    np.testing.assert_allclose(features, alone, atol=1e-5)
    torch.testing.assert_close(from_features, logits, atol=1e-5, rtol=0)


def test_the_probe_picks_c_on_validation_and_separates_separable_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    features = rng.normal(size=(300, 8)) + labels[:, None] * 3.0
    model, c = fit_logistic_probe(features[:200], labels[:200], features[200:], labels[200:])
    scores = model.predict_proba(features[200:])[:, 1]
    assert ((scores >= 0.5) == labels[200:]).mean() > 0.95


def test_the_backbone_is_counted_on_a_checkout_where_the_embedded_model_is_not_written_out_yet(tiny_phi3, monkeypatch):
    """Writing the embedded model out reads its weights: it must not run under the meta device."""
    from transformers import AutoConfig, AutoModel

    def materialise(reference: str) -> str:
        assert torch.empty(1).device.type == "cpu", "the embedded model was materialised on the meta device"
        return str(tiny_phi3)

    monkeypatch.setattr("safety_classifier.embedded.resolve_model_reference", materialise)
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(tiny_phi3))
    assert compare_methods.backbone_parameters() == sum(parameter.numel() for parameter in backbone.parameters())
    assert compare_methods.machine_description().startswith(f"{os.cpu_count()} CPU cores, ")


def _row(name: str, auprc: float) -> dict:
    test = {"accuracy": 0.9, "precision": 0.5, "recall": 0.6, "f1": 0.55, "roc_auc": 0.8, "auprc": auprc,
            "jailbreak_recall": 0.75}
    return {"row": name, "method": f"method {name}", "backbone": "B", "backbone_parameters": 134_515_008,
            "trainable_parameters": 1_153, "training_seconds": 125.0, "test": test,
            "validation": {"auprc": auprc + 0.01, "f1": 0.6}}


def test_the_table_shows_each_rows_file_and_names_the_missing_rows(tmp_path):
    for name, auprc in (("lora-r16", 0.7), ("tfidf-logreg", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(_row(name, auprc)))
    (tmp_path / "lora-r16" / "validation_history.json").write_text(json.dumps([{"epoch": 1.0, "auprc": 0.65},
                                                                                 {"epoch": 2.0, "auprc": 0.71}]))
    rows = report.load_rows(tmp_path)
    assert [row["row"] for row in rows] == ["tfidf-logreg", "lora-r16"], "rows follow the table's order"
    table = report.results_table(rows)
    lines = table.splitlines()
    assert lines[2].startswith("| method tfidf-logreg | B | 134.5 M | 1,153 | 0.900 |")
    assert "**0.750**" in lines[2] and "| 0.700 |" in lines[3], "the best AUPRC is bold"
    assert "2.1 min" in lines[2]
    assert "Not run yet:" in table and "`qlora-r32`" in table and "`lora-r16`" not in table.split("Not run yet:")[1]
    assert ("Best fine-tuned row by test AUPRC: method lora-r16, AUPRC 0.700 and F1 0.550; the goal "
            "(AUPRC >= 0.86, F1 >= 0.79) is not met; its jailbreak recall 0.750 (goal >= 0.85, not met). "
            "Lowest LoRA/QLoRA row: method lora-r16, AUPRC 0.700 (goal: every "
            "one >= 0.84, not met). Best baseline: method tfidf-logreg, AUPRC 0.750") in table
    assert "Calibration on the test subset" not in table, "no row here has uncalibrated figures"
    validation = table.split("Validation split")[1].splitlines()
    assert validation[2] == ("| Method | AUPRC after epoch 1 | AUPRC after epoch 2 | Saved classifier: AUPRC "
                             "| Saved classifier: F1 at its threshold |")
    assert validation[4:7] == ["| method tfidf-logreg | — | — | 0.760 | 0.600 |",
                               "| method lora-r16 | 0.650 | 0.710 | 0.710 | 0.600 |", ""], "baselines have no epochs"


def test_the_calibration_table_reports_each_fine_tuned_rows_ece_and_brier_against_the_goal():
    calibrated, miscalibrated, older = _row("lora-r16", 0.7), _row("top-1", 0.6), _row("top-2", 0.65)
    calibrated["test"].update(ece=0.025, brier=0.04, uncalibrated={"ece": 0.05, "brier": 0.05})
    miscalibrated["test"].update(ece=0.032, brier=0.07, uncalibrated={"ece": 0.08, "brier": 0.09})
    calibrated["training_arguments"] = {"calibration": "platt"}
    miscalibrated["training_arguments"] = {"calibration": "temperature"}
    lines = report.calibration_table([_row("tfidf-logreg", 0.75), older, calibrated, miscalibrated])
    body = [line for line in lines if line.startswith("| method")]
    assert body == ["| method lora-r16 | Platt scaling | 0.050 | 0.025 | 0.050 | 0.040 |",
                    "| method top-1 | temperature | 0.080 | 0.032 | 0.090 | 0.070 |"], \
        "fine-tuned rows with both figures only, each with its own calibration"
    assert lines[-1] == ("Goal, every fine-tuned row: test ECE <= 0.03 and a Brier score below the uncalibrated one: "
                         "not met by method top-1. Run before calibration existed, without these figures: method top-2.")
    assert report.calibration_table([calibrated])[-1].endswith("the uncalibrated one: met.")


def test_the_guard_model_table_puts_our_f1_among_the_published_ones_best_first():
    rows = [_row("lora-r16", 0.7)]
    rows[0]["test"]["f1"] = 0.79
    lines = report.guard_model_table(rows)
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| Model")]
    assert len(body) == len(report.PUBLISHED_GUARD_F1) + 1
    assert body[0] == "| Qwen3Guard-8B (loose) (published) | no | 82.8 |"
    assert body[1] == "| method lora-r16, B (this toolkit) | yes | 79.0 |", "ours, between 82.8 and 78.8"
    assert body[2] == "| GuardReasoner-8B (published) | no | 78.8 |"
    assert "were not trained on ToxicChat" in lines[0]


def test_the_results_page_and_the_readme_headline_are_the_tables_generated_from_results():
    """Nobody edits the numbers by hand: docs/results.md's tables and README.md's headline table are
    exactly what results/ gives (what `python experiments/report.py --check` checks)."""
    pages = report.generated_pages(report.load_rows())
    assert set(pages) == {REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results.md"}
    for path, (current, updated) in pages.items():
        assert current == updated, f"{path.name} is stale: run python experiments/report.py"
    readme = (REPO_ROOT / "README.md").read_text()
    headline = readme.split(report.HEADLINE_BEGIN)[1].split(report.HEADLINE_END)[0]
    assert "(docs/results.md)" in headline and len(headline.strip().splitlines()) <= 15, "the README's table is short"


def test_the_headline_keeps_the_baselines_the_best_rows_the_best_of_each_strategy_and_category_rows():
    rows = [_row("tfidf-logreg", 0.75), _row("top-1", 0.60), _row("top-3", 0.70), _row("lora-r16", 0.85),
            _row("lora-r32", 0.86), _row("lora-r64", 0.84), _row("qlora-r16", 0.80), _row("qlora-r32", 0.79),
            _row("lora-r16-categories", 0.83), _row("lora-r16-top8-all-sources", 0.74)]
    for row in rows[-2:]:  # the second, a superseded recipe, stays in docs/results.md only
        row["validation"]["categories"] = {"macro": {"f1": 0.8}}
    chosen = [row["row"] for row in report.headline_rows(rows, best=2)]
    assert chosen == ["tfidf-logreg", "top-3", "lora-r16", "lora-r32", "qlora-r16", "lora-r16-categories"]
    table = report.headline_table(rows).splitlines()
    assert table[0] == "| Method | Trainable params | AUPRC | F1 | Recall | Jailbreak recall | ECE | Training time |"
    assert "| **0.860** |" in table[5] and table[2].endswith("| — | 2.1 min |"), "best AUPRC bold; baselines lack ECE"
    assert report.headline_table([]) == "No results yet: run `make results`."


def test_the_search_tables_on_the_experiments_log_are_the_ones_generated_from_the_records():
    import search

    page = REPO_ROOT / "docs" / "experiments-log.md"
    assert page.read_text() == search.page_with_tables(search.load_records(search.SEARCH_DIR), page), \
        "run: python experiments/search.py --table"


def test_a_category_row_gets_its_table_goals_and_figure(tmp_path):
    from safety_classifier.categories import category_metrics
    from safety_classifier.labels import LabelSchema

    schema = LabelSchema.from_codes(["S1", "S5"])
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    scores = np.array([[0.9, 0.1], [0.4, 0.3], [0.2, 0.8], [0.6, 0.7]])
    categories = category_metrics(schema, targets, scores, np.array([0.5, 0.5]))
    categories["binary_recall"] = 0.75
    categories["binary_recall_per_category"] = {"S1": 1.0, "S5": 0.5}
    alone, both = _row("lora-r16", 0.80), _row("lora-r16-categories", 0.795)
    both["validation"]["categories"] = categories
    both["validation"]["sources"] = {"ailuminate_en_dev": {"auprc": None}, "toxicchat0124_train": {"auprc": 0.777}}
    both["training_seconds"] = 150.0
    lines = report.category_tables([alone, both])
    assert "| S1 Violent Crimes | 0.500 | 0.500 | 0.500 | 0.833 | 0.500 | 2 | 1.000 |" in lines
    assert "| S5 Specialized Advice | 1.000 | 1.000 | 1.000 | 1.000 | 0.500 | 2 | 0.500 |" in lines
    summary = lines[-1]
    assert "macro F1 0.750 (goal >= 0.8)" in summary
    assert (f"as the classifier names them, judged with thresholds chosen on the other half of the rows, "
            f"{categories['named_macro_f1_out_of_fold']:.3f}") in summary
    assert "mean over categories, 1.000" in summary, "S5 (contextual) is left out of the recall goal"
    assert "ToxicChat test AUPRC 0.795 against 0.800" in summary and "ToxicChat rows" in summary
    assert "0.777 against 0.810" in summary and "(+20 %; goal <= +30 %)" in summary
    assert report.category_tables([alone]) == []
    both["test"].update(safe_rows_category_score_over_threshold=0.25, safe_rows_flagged_with_a_category=0.012,
                        safe_rows_n=2491)
    assert "on the 2,491 safe ToxicChat test prompts, some category score at or over its threshold for 0.250, " \
           "flagged with a category (under an unsafe verdict) 0.012" in report.category_tables([alone, both])[-1]
    both["validation"]["categories"].update(safe_rows_category_score_over_threshold=0.062,
                                            safe_rows_flagged_with_a_category=0.029, safe_rows_n=242)
    assert "on the 242 safe ToxicChat validation prompts, some category score at or over its threshold for 0.062, " \
           "flagged with a category (under an unsafe verdict) 0.029; on the 2,491 safe ToxicChat test" \
           in report.category_tables([alone, both])[-1]
    # A row with a category route: the goal's recall pooled over the rows outside S5, with and without it.
    both["validation"]["categories"].update(category_route_threshold=0.08, binary_recall_harmful=0.9,
                                            binary_recall_harmful_without_route=0.4)
    lines = report.category_tables([alone, both])
    assert "unsafe recall on the rows of S1-S4 and S6-S12 0.900 (goal >= 0.9); without the category route 0.400" \
        in lines[-1] and "mean over categories" not in lines[-1]
    assert any("or the largest category score >= 0.080)." in line for line in lines)
    alone["training_arguments"], both["training_arguments"] = {"batch_size": 8}, {"batch_size": None}
    summary = report.category_tables([alone, both])[-1]
    assert "not compared with" in summary and "batch_size None vs 8" in summary and "against 0.800" not in summary
    path = report_figures.draw_category_figure(both, tmp_path)
    assert path.name == "categories.png" and path.stat().st_size > 10_000


def test_the_search_runs_each_setting_on_validation_only_and_skips_finished_ones(tiny_phi3, tmp_path, capsys):
    import search

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    synthetic_rows(120, seed=1).to_csv(data_dir / "toxicchat0124_train.csv", index=False)
    flags = ["--strategy", "lora", "--data-dir", str(data_dir), "--model", str(tiny_phi3),
             "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"),
             "--grid", "epochs=1", "lora_r=4", "dtype=fp32", "class_weights=balanced,none"]
    assert search.main(flags) == 0
    records = search.load_records(tmp_path / "results")
    assert [record["setting"]["class_weights"] for record in records] == ["balanced", "none"]
    for record in records:
        assert "--test-file" not in record["command"] and "--class-weights" in record["command"]
        assert record["training_arguments"]["class_weights"] == record["setting"]["class_weights"]
        assert 0.0 <= record["validation"]["auprc"] <= 1.0 and len(record["validation_history"]) == 1
    assert not list((tmp_path / "runs" / "lora").iterdir()), "the search keeps records, not classifiers"
    capsys.readouterr()
    assert search.main(flags) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2
    table = search.search_table(records).splitlines()
    assert table[0] == ("| Strategy | Setting (on top of the defaults) | Batches | AUPRC epoch 1 | Saved: AUPRC "
                        "| Saved: F1 | Training time |")
    assert len(table) == 4 and "class_weights balanced" in "".join(table)
    assert all(line.split(" | ")[2] == "8 rows" for line in table[2:]), "the default batches are named"
    records[0]["training_arguments"].update(batch_size=None, max_batch_tokens=512)
    assert search.batches_label(records[0]) == "512 tokens"
    records[0]["training_arguments"].update(max_batch_tokens=None)
    assert search.batches_label(records[0]) == "2,048 tokens", "records from before 8-row batches were the default"


def test_a_category_search_adds_the_category_source_and_keeps_its_records_apart(tiny_phi3, tmp_path):
    import search

    data_dir = tmp_path / "data" / "toxicchat"
    data_dir.mkdir(parents=True)
    synthetic_rows(120, seed=1).to_csv(data_dir / "toxicchat0124_train.csv", index=False)
    flags = ["--strategy", "lora", "--data-dir", str(data_dir), "--model", str(tiny_phi3),
             "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"), "--categories",
             "--grid", "epochs=1", "lora_r=4", "dtype=fp32", "category_loss_weight=3"]
    with pytest.raises(SystemExit, match="ailuminate_en_dev.csv not found"):
        search.main(flags)
    (tmp_path / "data" / "ailuminate").mkdir()
    category_rows(48, seed=3).to_csv(tmp_path / "data" / "ailuminate" / "ailuminate_en_dev.csv", index=False)
    assert search.main(flags) == 0
    [record] = search.load_records(tmp_path / "results")
    assert (tmp_path / "results" / "lora-categories").is_dir() and record["categories"]
    assert "--extra-train-sources" in record["command"] and "--category-loss-weight 3" in record["command"]
    assert record["training_arguments"]["category_loss_weight"] == 3.0
    assert search.search_table([record]) == "No search run yet.", "ToxicChat-alone table: no category runs"
    table = search.category_search_table([record]).splitlines()
    assert table[0].startswith("| Strategy | Setting (on top of the defaults) | Batches | ToxicChat rows: AUPRC |")
    macro_f1 = record["validation"]["categories"]["macro"]["f1"]
    assert len(table) == 3 and f"| {macro_f1:.3f} |" in table[2] and "category_loss_weight 3" in table[2]
    alarms = record["validation"]["categories"]["safe_rows_category_score_over_threshold"]
    # The defaults: safe rows teach "no category", so the scores are the head's own (conditional).
    assert record["category_score_rule"] == "conditional" and f"| conditional | {100 * alarms:.1f} % / " in table[2]
    categories = record["validation"]["categories"]
    route = categories["category_route_threshold"]
    assert f"| {categories['binary_recall']:.3f}{'' if route is None else f' (route {route:.3f})'} |" in table[2]
    del record["category_score_rule"], record["validation"]["categories"]["safe_rows_category_score_over_threshold"]
    assert "| conditional | - |" in search.category_search_table([record]), "a record from before both were stored"


def test_the_category_sources_weight_is_a_grid_key_of_category_searches(tmp_path):
    """`category_source_weight` is not a training option but the category source's `weight=`."""
    import search

    train_file, run_dir, category_file = tmp_path / "train.csv", tmp_path / "run", tmp_path / "ailuminate_en_dev.csv"
    setting = {"category_source_weight": "2", "epochs": "1"}
    command = search.command_for("lora", setting, train_file, run_dir, None, category_file)
    spec = command[command.index("--extra-train-sources") + 1]
    assert spec.endswith("category=category,validation=0.25,weight=2") and "--category-source-weight" not in command
    assert command[command.index("--epochs") + 1] == "1" and setting["category_source_weight"] == "2"
    plain = search.command_for("lora", {}, train_file, run_dir, None, category_file)
    # without the key, the results row's weight (chosen on validation), once
    assert plain[plain.index("--extra-train-sources") + 1].endswith(f"validation=0.25,weight={search.AILUMINATE_SOURCE_WEIGHT}")
    with pytest.raises(SystemExit, match="category_source_weight needs --categories"):
        search.command_for("lora", setting, train_file, run_dir, None, None)
    # make demo's mixture (every source) and the two-source one hold the AILuminate file as the results row's
    # category source trains on it
    for recipe in ("categories.txt", "all-sources.txt"):
        mixture = (REPO_ROOT / "recipes" / recipe).read_text().splitlines()
        assert ailuminate_source_spec("../shared/data/ailuminate/ailuminate_en_dev.csv") in mixture
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "SOURCES ?= recipes/all-sources.txt" in makefile and "@$(SOURCES)" in makefile


def test_the_category_route_counts_what_a_second_threshold_would_flag():
    predictions = pd.DataFrame({
        "label": [0, 0, 0, 1, 1, 1, 1],
        "unsafe_probability": [0.1, 0.1, 0.9, 0.9, 0.1, 0.2, 0.1],
        "source": ["main", "main", "main", "main", "harms", "harms", "harms"],
        "category": ["", "", "", "", "S1", "S2", "S1"],
        "score_S1": [0.00, 0.30, 0.00, 0.00, 0.60, 0.00, 0.15],
        "score_S2": [0.05, 0.00, 0.00, 0.00, 0.00, 0.25, 0.00],
    })
    metadata = {"threshold": 0.5, "main_source": "main",
                "categories": [{"code": "S1", "threshold": 0.5}, {"code": "S2", "threshold": 0.2}]}
    read = category_route.RoutePredictions.read(predictions, metadata)
    rows = {row["rule"]: row for row in category_route.route_table(read, metadata, [0.2])}
    alone, own, largest = rows.values()
    assert alone["recall_on_category_rows"] == 0.0 and alone["main_source_safe_rows_flagged"] == pytest.approx(1 / 3)
    # S1 at 0.5 and S2 at 0.2 catch two of the three category rows, no further safe row.
    assert own["recall_on_category_rows"] == pytest.approx(2 / 3) and own["main_source_safe_rows_flagged"] == pytest.approx(1 / 3)
    # The largest score at 0.2 catches the same two, and the safe row scoring S1 0.30.
    assert largest["recall_on_category_rows"] == pytest.approx(2 / 3)
    assert largest["main_source_safe_rows_flagged"] == pytest.approx(2 / 3)
    assert all(row["main_source_recall"] == 1.0 for row in rows.values())
    # A test file: main-source rows only, no category rows to recall.
    test_rows = predictions[predictions.source == "main"].drop(columns=["source", "category"])
    test_read = category_route.RoutePredictions.read(test_rows, metadata)
    assert category_route.route_table(test_read, metadata, [0.2])[0]["recall_on_category_rows"] is None


def test_category_recall_scores_the_held_out_category_rows_with_each_classifiers_verdict(tiny_lora_classifier, tmp_path):
    from safety_classifier.inference import load_classifier

    data_dir = tmp_path / "data" / "toxicchat"
    data_dir.mkdir(parents=True)
    synthetic_rows(120, seed=1).to_csv(data_dir / "toxicchat0124_train.csv", index=False)
    (tmp_path / "data" / "ailuminate").mkdir()
    category_rows(48, seed=3).to_csv(tmp_path / "data" / "ailuminate" / "ailuminate_en_dev.csv", index=False)
    rows, codes = category_recall.held_out_category_rows(data_dir)
    assert len(rows.texts) == len(codes) == 12 and set(codes) == {"S1", "S2", "S8", "S9"}  # validation=0.25 of 48
    result = category_recall.category_recall(tiny_lora_classifier, rows, codes, dtype="fp32")
    classifier = load_classifier(tiny_lora_classifier, dtype="fp32")  # a binary one: P(unsafe) decides alone
    called = classifier.unsafe_probabilities(rows.texts, show_progress=False) >= classifier.threshold
    assert result["recall"] == result["recall_outside_s5"] == pytest.approx(called.mean())
    assert result["rows"] == result["rows_outside_s5"] == 12



def test_heads_at_their_own_default_learning_rates_are_the_same_recipe():
    category_spec = "ailuminate.csv,text=prompt_text,category=category"
    binary = {"training_arguments": {"head_learning_rate": 1e-3, "extra_train_sources": None, "epochs": 2}}
    categories = {"training_arguments": {"head_learning_rate": 3e-3, "extra_train_sources": [category_spec], "epochs": 2}}
    assert report.recipe_differences(categories, binary) == []
    chosen = {"training_arguments": {"head_learning_rate": 1e-3, "extra_train_sources": [category_spec], "epochs": 2}}
    assert report.recipe_differences(chosen, binary) == []  # the same rate, whatever the defaults
    assert report.recipe_differences(chosen, categories) == ["head_learning_rate 0.001 vs 0.003"]
    longer = {"training_arguments": {**categories["training_arguments"], "epochs": 3}}
    assert report.recipe_differences(longer, binary) == ["epochs 3 vs 2"]


def test_a_rows_source_table_notes_its_answers_and_the_refusals_apart():
    entry = lambda n, share, auprc, fpr: {"n": n, "unsafe_share": share, "auprc": auprc, "recall": 0.5, "fpr": fpr}  # noqa: E731
    responses = {"n": 140, "auprc": 0.7, "f1": 0.68, "recall": 0.9, "fpr": 0.6, "threshold": 0.3,
                 "refusal_n": 160, "refusal_fpr": 0.25}
    row = {"method": "M", "validation": {"sources": {"main": entry(280, 0.1, 0.8, 0.05), "pku": entry(140, 0.5, 0.7, 0.6),
                                                     "refusals": entry(160, 0.0, None, 0.3)},
                                         "source_macro_auprc": 0.8, "lookalike_n": 0, "responses": responses}}
    lines = report.source_tables([row])
    assert "| refusals | 160 | 0.0% | — | — | 0.300 |" in lines
    assert ("answers (140 validation pairs, split by prompt): AUPRC 0.700 (goal >= 0.85), F1 0.680 (goal >= 0.75), "
            "recall 0.900 and FPR 0.600 at the answers' threshold 0.300; refusals judged unsafe at that threshold "
            "0.250 (160 validation pairs, wordings not trained on).") in lines[-1]
    del responses["refusal_n"]
    assert "refusals judged" not in report.source_tables([row])[-1]
