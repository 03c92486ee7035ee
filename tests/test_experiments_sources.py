"""The experiments over every prompt source: quality per minute (issue 38), leave-one-group-out
scoring and the source-mixture search (issue 39): their commands, records and tables."""

from __future__ import annotations

import json
import random

import cross_source
import mixture_search
import numpy as np
import pandas as pd
import pytest
import quality_per_minute
import search
from conftest import CATEGORY_TEMPLATES, SAFE_TEMPLATES, TOPICS, category_rows, synthetic_rows

from safety_classifier.evaluation import mixture_objective

# stem -> (unsafe rows, safe rows, their category): one category a file, and 20 rows where there are
# two classes, keep a stratified 10 % validation share possible on the few rows that keep the runs short
HARM_FILES = {
    "guardreasoner_train_sample": (10, 10, ""), "hatecheck": (12, 8, "S9"), "toxigen_statements": (10, 10, "S9"),
    "cyberseceval": (10, 10, "S2"), "do_not_answer": (16, 4, "S1"), "catqa": (10, 0, "S8"),
    "strongreject": (10, 0, "S1"), "advbench": (10, 0, ""),
}


def harm_rows(unsafe: int, safe: int, category: str, seed: int) -> pd.DataFrame:
    """A harm_prompts file: text, label, category (blank on safe rows and where the source has none), source_label."""
    rng = random.Random(seed)
    template = CATEGORY_TEMPLATES.get(category, CATEGORY_TEMPLATES["S8"])
    rows = [{"text": template.format(rng.choice(TOPICS)), "label": 1, "category": category, "source_label": "harm"}
            for _ in range(unsafe)]
    rows += [{"text": rng.choice(SAFE_TEMPLATES).format(rng.choice(TOPICS)), "label": 0, "category": "",
              "source_label": "benign"} for _ in range(safe)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The shared data's layout, in small: ToxicChat, AILuminate, every harm_prompts file, and a
    responses file that no experiment here may train on."""
    root = tmp_path_factory.mktemp("shared-data")
    for folder in ("toxicchat", "ailuminate", "harm_prompts", "responses"):
        (root / folder).mkdir()
    synthetic_rows(80, seed=1).to_csv(root / "toxicchat" / "toxicchat0124_train.csv", index=False)
    category_rows(24, seed=3).to_csv(root / "ailuminate" / "ailuminate_en_dev.csv", index=False)
    for seed, (stem, (unsafe, safe, category)) in enumerate(HARM_FILES.items()):
        harm_rows(unsafe, safe, category, seed).to_csv(root / "harm_prompts" / f"{stem}.csv", index=False)
    pd.DataFrame({"prompt": ["q"], "response": ["a"], "label": [0]}).to_csv(root / "responses" / "pku_saferlhf.csv",
                                                                         index=False)
    return root


def spec_files(command: list[str]) -> list[str]:
    """The file stems of a command's --extra-train-sources specs."""
    start = command.index("--extra-train-sources") + 1
    specs = command[start: next(i for i in range(start, len(command)) if command[i].startswith("--"))]
    return [spec.split(",")[0].rsplit("/", 1)[-1].removesuffix(".csv") for spec in specs]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def specs_of(command: list[str]) -> dict[str, str]:
    """{file stem: its --extra-train-sources spec} of a command."""
    start = command.index("--extra-train-sources") + 1
    return {stem: command[start + index] for index, stem in enumerate(spec_files(command))}


def spec_options(spec: str) -> dict[str, str]:
    """A spec's weight=, cap= and max_length= (the options the source keys set)."""
    pairs = dict(part.split("=", 1) for part in spec.split(",")[1:])
    return {key: value for key, value in pairs.items() if key in search.SOURCE_OPTIONS}


# ---- quality per minute -------------------------------------------------------------------------------


def test_quality_per_minute_trains_every_recipe_on_every_prompt_source(data_root, tmp_path, capsys):
    flags = ["--data-root", str(data_root), "--results-dir", str(tmp_path / "records"), "--epochs", "1",
             "--cap", "50", "--dry-run"]
    assert quality_per_minute.main(flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(quality_per_minute.RECIPES) >= 5
    commands = {line.split(":")[0].split("] ")[1]: line.split(": ", 1)[1].split() for line in lines}
    assert option(commands["lora-r16"], "--lora-r") == "16" and "--lora-layers" not in commands["lora-r16"]
    for k in (2, 4, 8):
        assert option(commands[f"lora-r16-top{k}"], "--lora-layers") == f"top:{k}"
    assert option(commands["top-3"], "--num-layers") == "3" and commands["top-3"][1] == "train_full_layers.py"
    assert option(commands["head-only"], "--num-layers") == "0"
    for command in commands.values():
        assert option(command, "--train-file").endswith("toxicchat/toxicchat0124_train.csv")
        assert spec_files(command) == ["ailuminate_en_dev", *sorted(HARM_FILES)], "every source, no responses"
        assert option(command, "--seed") == "42" and option(command, "--epochs") == "1"
        assert "--test-file" not in command and all(",cap=50" in spec for spec in command if ",text=" in spec)
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "head-only.json").write_text("{}")
    assert quality_per_minute.main([*flags, "--recipes", "head-only", "top-3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "[1/2] head-only: done, skipped"


def test_quality_per_minute_takes_the_mixture_searchs_source_keys_in_set(data_root, tmp_path, capsys):
    flags = ["--data-root", str(data_root), "--results-dir", str(tmp_path), "--recipes", "lora-r16-top4", "--dry-run"]
    assert quality_per_minute.main([*flags, "--set", "harm_prompts_cap=7", "harm_prompts_max_length=128",
                                    "epochs=1"]) == 0
    command = capsys.readouterr().out.split(": ", 1)[1].split()
    specs = specs_of(command)
    assert all(spec_options(specs[stem]) == {"cap": "7", "max_length": "128"} for stem in HARM_FILES)
    assert spec_options(specs["ailuminate_en_dev"]) == {"weight": "1.2"}, "AILuminate is no harm_prompts file"
    assert option(command, "--epochs") == "1" and "--harm-prompts-cap" not in command
    mixture = mixture_search.command_for("lora-r16-top4", {"harm_prompts_cap": "7", "harm_prompts_max_length": "128"},
                                         data_root, tmp_path, None)
    assert specs_of(mixture) == specs, "the same specs as the mixture search's for the same keys"
    # --cap is every further source's cap; a source key's cap (its own or its folder's, none too) wins.
    setting = {"harm_prompts_cap": "9", "hatecheck_cap": "none", "guardreasoner_cap": "3", "catqa_weight": "2"}
    command = quality_per_minute.command_for("lora-r16-top4", data_root, 1.0, 50, setting, tmp_path, None)
    options = {stem: spec_options(spec) for stem, spec in specs_of(command).items()}
    assert options["ailuminate_en_dev"] == {"weight": "1.2", "cap": "50"}
    assert options["hatecheck"] == {} and options["guardreasoner_train_sample"] == {"cap": "3"}
    assert options["catqa"] == {"cap": "9", "weight": "2"} and options["advbench"] == {"cap": "9"}
    plain = quality_per_minute.command_for("lora-r16-top4", data_root, 1.0, 50, {}, tmp_path, None)
    assert all(spec_options(spec)["cap"] == "50" for spec in specs_of(plain).values())


def test_quality_per_minute_counts_the_runs_tokens_and_flops(data_root, tiny_phi3, tmp_path, monkeypatch):
    """A record from a run's files: real tokens as the run encodes its rows, FLOPs by the documented
    formula, the share of the measured peak; the training itself is stood in for."""
    from safety_classifier.modeling import load_tokenizer

    command = quality_per_minute.command_for("lora-r16-top4", data_root, 2.0, None, {"lora_layers": "top:1"},
                                             tmp_path / "run", str(tiny_phi3))
    plan = quality_per_minute.parsed_plan(command)
    tokenizer = load_tokenizer(str(tiny_phi3))
    tokens = quality_per_minute.tokens_per_epoch(plan)
    from safety_classifier.training import load_training_splits

    with quality_per_minute.contextlib.chdir(quality_per_minute.REPO_ROOT):
        texts = load_training_splits(plan).train.texts
    assert tokens == sum(len(ids) for ids in tokenizer(texts)["input_ids"]) and len(texts) > 80
    blocks, top = quality_per_minute.backbone_shape(str(tiny_phi3), 2)
    assert len(blocks) == 2 and top > 64 * 2, "final norm and a 2-output head"
    each_epoch, once, formula = quality_per_minute.flops_per_token(plan, blocks, top)
    assert (each_epoch, once) == (4.0 * (blocks[1] + top), 2.0 * blocks[0]) and formula.endswith(" once")
    head_only = quality_per_minute.parsed_plan(quality_per_minute.command_for(
        "head-only", data_root, 1.0, None, {}, tmp_path / "run", str(tiny_phi3)))
    assert quality_per_minute.flops_per_token(head_only, blocks, top)[:2] == (6.0 * top, 2.0 * sum(blocks))

    metrics = {"validation": {"auprc": 0.8, "source_macro_auprc": 0.7, "sources": {
        "toxicchat0124_train": {"auprc": 0.8, "recall": 0.75, "fpr": 0.1}, "hatecheck": {"auprc": 0.6}}}}
    metadata = {"training_seconds": 30.0, "prefix_cache_seconds": 12.0, "trainable_parameters": 1234,
                "labels": {"0": "safe", "1": "unsafe"},
                "training_arguments": {"dtype": "fp32", "epochs": 2.0}}
    monkeypatch.setattr(quality_per_minute, "run_training_command", lambda *_: (metadata, metrics, []))
    monkeypatch.setattr(quality_per_minute, "matmul_peak_tflops", lambda dtype: 0.5)
    record = quality_per_minute.run_recipe("lora-r16-top4", command, tmp_path / "run")
    assert record["dtype"] == "float32" and record["cpu"] and (record["training_minutes"], record["prefix_minutes"]) == (0.5, 0.2)
    # Rates over the 18 s of training steps, the 12 s of prefix states left out.
    assert record["tokens_per_second"] == pytest.approx(2 * tokens / 18.0)
    assert record["flops"] == pytest.approx(tokens * (2 * each_epoch + once))
    assert record["peak_fraction"] == pytest.approx(tokens * 2 * each_epoch / 18.0 / 0.5e12)
    assert (record["toxicchat_auprc"], record["source_macro_auprc"]) == (0.8, 0.7)


def quality_record(recipe: str, minutes: float, auprc: float) -> dict:
    return {"recipe": recipe, "trainable_parameters": 460_000, "training_minutes": minutes, "tokens_per_second": 1234.5,
            "peak_fraction": 0.123, "toxicchat_auprc": auprc, "source_macro_auprc": auprc - 0.1, "epochs": 2.0,
            "cores": 2, "cpu": "Some CPU", "dtype": "bfloat16",
            "flops_per_token": {"formula": "4 x 1,000 each epoch + 2 x 9,000 once"}}


def write_records(directory, records: dict[str, dict]) -> None:
    for name, record in records.items():
        search.write_record(directory / f"{name}.json", record)


def test_only_runs_over_a_cached_prefix_get_the_shared_prefix_store(data_root, tmp_path):
    """The training script's own parsing decides: top-N and LoRA top:K cache, LoRA on every block
    and --no-cache-prefix do not (the script would refuse --prefix-cache-dir with the latter)."""
    store = tmp_path / "prefix-cache"
    command = lambda recipe, setting: quality_per_minute.command_for(  # noqa: E731
        recipe, data_root, 1.0, 50, setting, tmp_path / recipe, None, store)
    for recipe in ("lora-r16-top4", "top-3", "head-only"):
        assert option(command(recipe, {}), "--prefix-cache-dir").endswith("prefix-cache"), recipe
    assert "--prefix-cache-dir" not in command("lora-r16", {})
    assert "--prefix-cache-dir" not in command("top-3", {"cache_prefix": "false"})


def test_quality_per_minute_table_goes_into_its_own_block_of_the_page(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("# Performance\n\nProse another engineer owns.\n")
    flags = ["--table", "--results-dir", str(tmp_path / "records"), "--page", str(page)]
    assert quality_per_minute.main(flags) == 0
    text = page.read_text()
    assert text.startswith("# Performance\n\nProse another engineer owns.\n\n" + quality_per_minute.TABLE_BEGIN)
    assert "No quality-per-minute run yet" in text and text.endswith(quality_per_minute.TABLE_END + "\n")
    write_records(tmp_path / "records", {"head-only": {**quality_record("head-only", 3.0, 0.6), "prefix_minutes": 2.5},
                                         "lora-r16": quality_record("lora-r16", 40.0, 0.85)})
    assert quality_per_minute.main(flags) == 0
    lines = page.read_text().split(quality_per_minute.TABLE_BEGIN)[1].splitlines()
    assert lines[1].startswith("## Quality per minute") and lines[2] == ""
    assert lines[3].startswith("| Recipe | Trainable params | Training time | of which prefix states | Real tokens/s | "
                               "Share of matmul peak |")
    assert lines[5] == ("| lora-r16 | 460,000 | 40.0 min | — | 1,234 | 12.3 % | 0.850 | 0.750 | "
                        "4 x 1,000 each epoch + 2 x 9,000 once |"), "the recipes in their own order"
    assert lines[6].startswith("| head-only | 460,000 | 3.0 min | 2.5 min | ")
    assert "2 cores, Some CPU, bfloat16; 2 epoch(s)" in lines[8]
    assert page.read_text().count(quality_per_minute.TABLE_BEGIN) == 1


# ---- cross-source ---------------------------------------------------------------------------------------


def test_a_left_out_group_is_absent_from_training_and_toxicchat_out_switches_the_main_file(data_root, tmp_path):
    command = lambda group: cross_source.command_for(group, data_root, "lora-r16-top4", {}, tmp_path, None)  # noqa: E731
    without_toxicchat = command("toxicchat")
    assert option(without_toxicchat, "--train-file").endswith("harm_prompts/guardreasoner_train_sample.csv")
    assert (option(without_toxicchat, "--text-column"), option(without_toxicchat, "--label-column")) == ("text", "label")
    assert "toxicchat0124_train" not in " ".join(without_toxicchat)
    assert spec_files(without_toxicchat) == ["ailuminate_en_dev", *sorted(set(HARM_FILES) - {"guardreasoner_train_sample"})]
    hate = command("hatecheck-toxigen")
    assert option(hate, "--train-file").endswith("toxicchat/toxicchat0124_train.csv")
    assert option(hate, "--text-column") == "user_input" and option(hate, "--lora-layers") == "top:4"
    assert spec_files(hate) == ["ailuminate_en_dev", *sorted(set(HARM_FILES) - {"hatecheck", "toxigen_statements"})]
    requests = command("harmful-requests")
    assert not {"catqa", "do_not_answer", "strongreject", "advbench"} & set(spec_files(requests))
    assert "--test-file" not in requests and "pku_saferlhf" not in " ".join(requests)


def test_cross_source_dry_run_prints_each_groups_command_and_skips_recorded_ones(data_root, tmp_path, capsys):
    flags = ["--data-root", str(data_root), "--results-dir", str(tmp_path), "--dry-run", "--recipe", "top-3",
             "--set", "epochs=1"]
    search.write_record(tmp_path / "ailuminate.json", {})
    assert cross_source.main(flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"[{i}/6] {group}" for i, group in enumerate(cross_source.GROUPS, 1)]
    assert lines[1] == "[2/6] ailuminate: done, skipped"
    assert "train_full_layers.py" in lines[0] and "--num-layers 3" in lines[0] and "--epochs 1" in lines[0]


def test_cross_source_takes_the_mixture_searchs_source_keys_in_set(data_root, tmp_path, capsys):
    """Each run gets the specs the mixture search gives for the same keys, on the files it trains on;
    the keys of a left-out file (or of the main file) apply to nothing, never become training options."""
    setting = {"harm_prompts_cap": "1000", "harm_prompts_max_length": "128", "hatecheck_weight": "2",
               "guardreasoner_cap": "5", "epochs": "1"}
    mixture = specs_of(mixture_search.command_for("lora-r16-top4", setting, data_root, tmp_path, None))
    assert spec_options(mixture["hatecheck"]) == {"cap": "1000", "max_length": "128", "weight": "2"}
    for group in cross_source.GROUPS:
        command = cross_source.command_for(group, data_root, "lora-r16-top4", setting, tmp_path, None)
        specs = specs_of(command)
        assert specs == {stem: mixture[stem] for stem in specs}, group
        assert option(command, "--epochs") == "1" and not {"--hatecheck-weight", "--guardreasoner-cap"} & set(command)
    # As in the mixture search: a key of no source is a training option (which the script refuses) ...
    unknown = {"nosuch_cap": "5"}
    assert option(cross_source.command_for("toxicchat", data_root, "top-3", unknown, tmp_path, None), "--nosuch-cap") == \
        option(mixture_search.command_for("top-3", unknown, data_root, tmp_path, None), "--nosuch-cap") == "5"
    # ... ToxicChat takes none, and a start of several sources is refused, even where they are left out.
    with pytest.raises(SystemExit, match="ToxicChat is the main source"):
        cross_source.command_for("toxicchat", data_root, "lora-r16-top4", {"toxicchat_cap": "2"}, tmp_path, None)
    with pytest.raises(SystemExit, match="starts several sources"):
        cross_source.command_for("harmful-requests", data_root, "lora-r16-top4", {"c_cap": "2"}, tmp_path, None)
    flags = ["--data-root", str(data_root), "--results-dir", str(tmp_path / "records"), "--dry-run",
             "--groups", "hatecheck-toxigen", "--set", "harm_prompts_cap=1000", "harm_prompts_max_length=128"]
    assert cross_source.main(flags) == 0
    printed = specs_of(capsys.readouterr().out.split(": ", 1)[1].split())
    keys = {"harm_prompts_cap": "1000", "harm_prompts_max_length": "128"}
    mixture = specs_of(mixture_search.command_for("lora-r16-top4", keys, data_root, tmp_path, None))
    assert printed == {stem: mixture[stem] for stem in printed} and "hatecheck" not in printed
    assert spec_options(printed["catqa"]) == {"cap": "1000", "max_length": "128"}


def cross_record(group: str, auprc: float, recall: float, fpr: float | None, against: str | None = None) -> dict:
    return {"group": group, "name": cross_source.GROUPS[group][0], "main_source": "toxicchat0124_train",
            "recipe": "lora-r16-top4", "unsafe_rows": 1200, "safe_rows": 0 if fpr is None else 300, "auprc": auprc,
            "auprc_against": against, "recall": recall, "fpr": fpr, "category_top1": 0.5}


def test_the_cross_source_table_has_the_mean_auprc_and_the_goals(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n")
    write_records(tmp_path / "records", {
        "ailuminate": cross_record("ailuminate", 0.95, 0.9, None, against="toxicchat0124_train"),
        "toxicchat": cross_record("toxicchat", 0.7, 0.85, 0.05)})
    assert cross_source.main(["--table", "--results-dir", str(tmp_path / "records"), "--page", str(page)]) == 0
    block = page.read_text().split(cross_source.TABLE_BEGIN)[1].split(cross_source.TABLE_END)[0]
    lines = block.strip().splitlines()[2:]
    assert lines[0].startswith("| Left out | Main source (threshold) | Recipe | Unsafe / safe rows | AUPRC |")
    assert lines[2] == "| ToxicChat | toxicchat0124_train | lora-r16-top4 | 1,200 / 300 | 0.700 | 0.850 | 0.050 | 0.500 | yes |"
    assert lines[3] == "| AILuminate | toxicchat0124_train | lora-r16-top4 | 1,200 / 0 | 0.950 † | 0.900 | — | 0.500 | yes |"
    assert lines[-1].startswith("Mean AUPRC over the 2 left-out group(s): 0.825. Goals (issue 39): mean AUPRC ≥ 0.85 "
                                "(not met); each group's recall ≥ 0.80 at ≤ 10% FPR on its safe rows (met by 2 of 2")


def test_left_out_figures_follow_the_runs_own_per_source_rule():
    rows = pd.DataFrame({"label": [1, 1, np.nan, 1], "category": ["S1", "S9", "S5", ""], "source": "x"})
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.7, 0.2], [0.5, 0.1, 0.2], [0.6, 0.3, 0.3]])
    verdicts = scores[:, 0] >= 0.5
    figures = cross_source.held_out_figures(rows, scores, verdicts, 0.5, ["S1", "S2"], np.array([0.1, 0.7]), "main")
    # No safe rows: ranked against the main source's two safe validation rows (0.1, 0.7).
    assert figures["auprc_against"] == "main" and figures["fpr"] is None
    assert figures["auprc"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3) and figures["recall"] == pytest.approx(2 / 3)
    # Category top-1 over the rows with a category (S5 without a label too); S9 is not the classifier's: a miss.
    assert (figures["category_rows"], figures["category_top1"]) == (3, pytest.approx(1 / 3))
    rows.loc[1, "label"] = 0
    figures = cross_source.held_out_figures(rows, scores, verdicts, 0.5, [], np.array([0.1, 0.7]), "main")
    assert figures["auprc_against"] is None and figures["fpr"] == 0.0 and figures["category_top1"] is None


def test_leaving_groups_out_trains_on_the_others_and_scores_the_group(data_root, tiny_phi3, tmp_path, capsys):
    flags = ["--data-root", str(data_root), "--results-dir", str(tmp_path / "records"), "--runs-dir",
             str(tmp_path / "runs"), "--model", str(tiny_phi3), "--groups", "toxicchat", "ailuminate",
             "--set", "epochs=1", "dtype=fp32", "lora_r=4", "lora_layers=top:1", "logging_steps=50",
             "harm_prompts_max_length=64"]
    assert cross_source.main(flags) == 0
    toxicchat, ailuminate = (json.loads((tmp_path / "records" / f"{group}.json").read_text())
                             for group in ("toxicchat", "ailuminate"))
    assert toxicchat["main_source"] == "guardreasoner_train_sample" and "toxicchat0124_train" not in toxicchat["command"]
    assert toxicchat["safe_rows"] > 0 and toxicchat["auprc_against"] is None and 0.0 <= toxicchat["fpr"] <= 1.0
    assert ailuminate["main_source"] == "toxicchat0124_train" and "ailuminate_en_dev" not in ailuminate["training_sources"]
    assert (ailuminate["unsafe_rows"], ailuminate["safe_rows"]) == (24, 0) and ailuminate["fpr"] is None
    assert ailuminate["auprc_against"] == "toxicchat0124_train" and 0.0 <= ailuminate["auprc"] <= 1.0
    assert ailuminate["category_rows"] == 24 and 0.0 <= ailuminate["category_top1"] <= 1.0
    for record in (toxicchat, ailuminate):
        assert "--test-file" not in record["command"] and 0.0 <= record["recall"] <= 1.0
        assert record["training_arguments"]["lora_layers"] == "top:1"
        assert record["setting"]["harm_prompts_max_length"] == "64", "the setting as given, source keys included"
        assert "catqa.csv,text=text,label=label,category=category,max_length=64" in record["command"]
    assert not list((tmp_path / "runs").iterdir()), "records are kept, classifiers are not"
    capsys.readouterr()
    assert cross_source.main(flags) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2


# ---- mixture search -----------------------------------------------------------------------------------


def test_mixture_keys_render_into_each_sources_spec(data_root, tmp_path):
    setting = {"harm_prompts_cap": "500", "guardreasoner_weight": "0.5", "guardreasoner_cap": "none",
               "ailuminate_weight": "2", "hatecheck_max_length": "128", "category_loss_weight": "3"}
    command = mixture_search.command_for("lora-r16-top4", setting, data_root, tmp_path / "run", None)
    start = command.index("--extra-train-sources") + 1
    specs = {spec.split(",")[0].rsplit("/", 1)[-1].removesuffix(".csv"): spec
             for spec in command[start:start + 1 + len(HARM_FILES)]}
    assert specs["guardreasoner_train_sample"].endswith(",text=text,label=label,category=category,weight=0.5"), \
        "a file's own key wins over its folder's; none leaves the option out"
    assert specs["hatecheck"].endswith(",category=category,cap=500,max_length=128")
    assert specs["advbench"].endswith(",category=category,cap=500")
    assert specs["ailuminate_en_dev"].endswith(",validation=0.25,weight=2"), "AILuminate's spec, its weight set"
    assert option(command, "--category-loss-weight") == "3" and "--harm-prompts-cap" not in command
    assert option(command, "--train-file").endswith("toxicchat0124_train.csv") and "--test-file" not in command
    with pytest.raises(SystemExit, match="ToxicChat is the main source"):
        mixture_search.command_for("lora-r16-top4", {"toxicchat_weight": "2"}, data_root, tmp_path, None)
    with pytest.raises(SystemExit, match="starts several sources"):
        mixture_search.command_for("lora-r16-top4", {"c_cap": "2"}, data_root, tmp_path, None)


def test_the_mixture_grid_is_searched_with_the_search_scripts_names(data_root, tmp_path, capsys):
    flags = ["--data-root", str(data_root), "--results-dir", str(tmp_path / "mixture"), "--dry-run",
             "--grid", "harm_prompts_cap=500,none", "guardreasoner_weight=0.5"]
    assert mixture_search.main(flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["[1/2] guardreasoner_weight=0.5_harm_prompts_cap=500",
                                                       "[2/2] guardreasoner_weight=0.5_harm_prompts_cap=none"]
    assert ",cap=500" in lines[0] and ",cap=" not in lines[1] and "guardreasoner_train_sample.csv,text=text" in lines[1]


def mixture_record(setting: dict, toxicchat: float, macro: float) -> dict:
    return {"recipe": "lora-r16-top4", "setting": setting, "toxicchat_auprc": toxicchat, "source_macro_auprc": macro,
            "objective": mixture_objective(toxicchat, macro), "training_seconds": 600.0,
            "validation_sources": {"toxicchat0124_train": {"auprc": toxicchat}, "hatecheck": {"auprc": 0.9},
                                   "advbench": {"auprc": None}}}


def test_the_mixture_table_ranks_settings_by_the_objective_in_its_own_block(tmp_path):
    page = tmp_path / "experiments-log.md"
    page.write_text(f"# Log\n\n{search.TABLE_BEGIN}\nkept\n{search.TABLE_END}\n")
    records = tmp_path / "search" / "mixture"
    write_records(records, {"a": mixture_record({"harm_prompts_cap": "500"}, 0.80, 0.70),
                            "b": mixture_record({"harm_prompts_cap": "none"}, 0.84, 0.80)})
    assert mixture_search.main(["--table", "--results-dir", str(records), "--page", str(page)]) == 0
    text = page.read_text()
    assert f"{search.TABLE_BEGIN}\nkept\n{search.TABLE_END}" in text, "the search tables are not touched"
    lines = text.split(mixture_search.TABLE_BEGIN)[1].splitlines()[2:]
    assert lines[1] == ("| Recipe | Setting (on top of the defaults) | Objective | ToxicChat rows: AUPRC | Mean AUPRC over "
                        "sources | toxicchat0124_train: AUPRC | advbench: AUPRC | hatecheck: AUPRC | Training time |")
    assert lines[3] == "| lora-r16-top4 | harm_prompts_cap none | 0.820 | 0.840 | 0.800 | 0.840 | — | 0.900 | 10.0 min |"
    assert lines[4].startswith("| lora-r16-top4 | harm_prompts_cap 500 | 0.750 |")
    assert search.load_records(tmp_path / "search") == [], "the search script's own tables leave mixture records out"


def test_the_generated_blocks_on_the_docs_pages_are_the_records():
    """Nobody edits these numbers by hand: each block is what its records give (run the script's --table)."""
    for script, results_dir, table in (
            (quality_per_minute, quality_per_minute.QUALITY_DIR, quality_per_minute.quality_table),
            (cross_source, cross_source.CROSS_SOURCE_DIR, cross_source.cross_source_table),
            (mixture_search, mixture_search.MIXTURE_DIR, mixture_search.mixture_table)):
        records = search.load_records(results_dir.parent, [results_dir.name])
        expected = search.page_with_block(script.PAGE, table(records), script.TABLE_BEGIN, script.TABLE_END)
        assert script.PAGE.read_text() == expected, f"run: python experiments/{script.__name__}.py --table"
