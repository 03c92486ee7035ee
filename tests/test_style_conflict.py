"""experiments/style_conflict.py: the main source's cross-validated AUPRC under each mixture."""

from __future__ import annotations

import json
import random

import pandas as pd
import style_conflict
from conftest import SAFE_TEMPLATES, TOPICS, UNSAFE_TEMPLATES, synthetic_rows


def _prompts(templates: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(templates).format(rng.choice(TOPICS)) for _ in range(count)]


def test_a_source_that_calls_the_main_sources_safe_style_unsafe_pulls_its_ranking_down(tmp_path):
    synthetic_rows(150, seed=3).to_csv(tmp_path / "main.csv", index=False)
    # AdvBench's file name puts it in the plain-harmful-requests group; its rows are the main
    # source's safe style, every one labelled unsafe.
    pd.DataFrame({"text": _prompts(SAFE_TEMPLATES, 90, seed=5), "label": 1}).to_csv(tmp_path / "advbench.csv", index=False)
    agreeing = _prompts(SAFE_TEMPLATES, 40, seed=6) + _prompts(UNSAFE_TEMPLATES, 40, seed=7)
    pd.DataFrame({"text": agreeing, "label": [0] * 40 + [1] * 40}).to_csv(tmp_path / "cyberseceval.csv", index=False)
    pd.DataFrame({"prompt": _prompts(UNSAFE_TEMPLATES, 30, seed=8), "response": ["I can't help with that."] * 15
                  + ["Sure, here is how."] * 15, "label": [0] * 15 + [1] * 15}).to_csv(tmp_path / "pku_saferlhf.csv",
                                                                                     index=False)
    sources = [f"{tmp_path}/advbench.csv,text=text,label=label", f"{tmp_path}/cyberseceval.csv,text=text,label=label",
               f"{tmp_path}/pku_saferlhf.csv,text=prompt,response=response,label=label"]

    texts, labels, extra = style_conflict.mixture_rows(str(tmp_path / "main.csv"), sources, 42, "user_input", "toxicity")
    assert len(texts) == len(labels) == 150, "the main source's whole training file: its training and validation rows"
    assert set(extra) == {"harmful-requests", "cyberseceval", "answers"}
    assert len(extra["harmful-requests"][0]) == 81, "the source's training rows (a tenth held out for validation)"
    assert all("\n\n" in text for text in extra["answers"][0]), "an answer is read after its prompt"

    records = style_conflict.conflict_table(texts, labels, extra, folds=3, seed=0, c=10.0, progress=lambda _: None)
    auprc = {record["mixture"]: record["auprc"] for record in records}
    assert len(records) == 1 + 3 + 1 + 3
    assert auprc["main source alone"] > 0.95
    assert auprc["+ harmful-requests"] < auprc["main source alone"] - 0.1
    assert auprc["+ cyberseceval"] > auprc["main source alone"] - 0.02
    assert auprc["every source - harmful-requests"] > auprc["every source"] + 0.05
    table = style_conflict.markdown(records, len(labels), 3)
    assert "| + harmful-requests | 81 |" in table and "150 training-file rows" in table


def test_the_command_writes_its_records(tmp_path, capsys):
    synthetic_rows(60, seed=4).to_csv(tmp_path / "main.csv", index=False)
    pd.DataFrame({"text": _prompts(UNSAFE_TEMPLATES, 20, seed=9), "label": 1}).to_csv(tmp_path / "strongreject.csv",
                                                                                     index=False)
    out = tmp_path / "conflict.json"
    assert style_conflict.main(["--train-file", str(tmp_path / "main.csv"), "--folds", "2", "--json", str(out),
                                "--extra-train-sources", f"{tmp_path}/strongreject.csv,text=text,label=label"]) == 0
    record = json.loads(out.read_text())
    assert record["main_rows"] == 60 and [r["mixture"] for r in record["records"]] == [
        "main source alone", "+ harmful-requests", "every source", "every source - harmful-requests"]
    assert "| every source |" in capsys.readouterr().out
