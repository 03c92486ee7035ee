"""Frozen-prefix states kept on disk between runs (--prefix-cache-dir), on tiny random backbones (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_training_flags
from test_lora_prefix import RECIPE, TOLERANCE
from test_prefix_cache import fresh_model, prompts_for
from test_reliability import flat_metrics

from safety_classifier import prefix_store
from safety_classifier.cli import parse_training_plan, train_main
from safety_classifier.formatting import encode_prompts
from safety_classifier.modeling import find_transformer_blocks, load_tokenizer
from safety_classifier.prefix_cache import PrefixCacheTooLarge, prefix_fingerprint, prefix_hidden_states_from_ids
from safety_classifier.prefix_store import stored_prefix_states


def count_computed_rows(monkeypatch) -> list[tuple[int, ...]]:
    """The rows whose prefix states `prefix_store` computes from their token ids from now on."""
    computed_rows = []
    original = prefix_store.prefix_hidden_states_from_ids

    def counting(model, input_ids, *args, **kwargs):
        computed_rows.extend(map(tuple, input_ids))
        return original(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(prefix_store, "prefix_hidden_states_from_ids", counting)
    return computed_rows


def model_and_rows(tiny_phi3):
    """(tokenizer, a fresh tiny model in eval mode, the test prompts' token ids, the pad id)."""
    tokenizer = load_tokenizer(str(tiny_phi3))
    return (tokenizer, fresh_model(str(tiny_phi3), tokenizer).eval(),
            encode_prompts(tokenizer, prompts_for(tokenizer), 64), tokenizer.pad_token_id)


def test_stored_states_equal_computed_ones_and_only_new_rows_are_computed(tiny_phi3, tmp_path, monkeypatch):
    _, model, ids, pad = model_and_rows(tiny_phi3)
    expected = prefix_hidden_states_from_ids(model, ids, 1, pad_token_id=pad)

    first, read, _ = stored_prefix_states(model, ids[:4], 1, tmp_path, pad_token_id=pad)
    assert read == 0 and len(list(tmp_path.glob("*/*.safetensors"))) == 1
    computed_rows = count_computed_rows(monkeypatch)
    # Every row, one of them twice: the first four are read, the other three computed once and added.
    rows = ids + [ids[5]]
    states, read, _ = stored_prefix_states(model, rows, 1, tmp_path, pad_token_id=pad)
    assert read == 4 and sorted(computed_rows) == sorted(map(tuple, ids[4:]))
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 2 and not list(tmp_path.glob("*/.*"))
    # Within float noise of one run over every row: the rows were batched with others of other lengths.
    for got, want in zip(states, expected + [expected[5]]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Rows read back are the very tensors stored.
    assert all(torch.equal(got, want) for got, want in zip(states[:4], first))

    computed_rows.clear()
    again, read, _ = stored_prefix_states(model, list(reversed(ids)), 1, tmp_path, pad_token_id=pad)
    assert read == len(ids) and computed_rows == []
    assert all(torch.equal(got, want) for got, want in zip(again, reversed(states[:-1])))


def test_a_deeper_prefix_continues_from_a_shallower_one_of_the_same_weights(tiny_phi3, tmp_path, monkeypatch):
    tokenizer, model, ids, pad = model_and_rows(tiny_phi3)
    expected = prefix_hidden_states_from_ids(model, ids, 0, pad_token_id=pad)
    # Another backbone's shallower prefix is on disk too: its fingerprint does not match, so it is never read.
    stranger = fresh_model(str(tiny_phi3), tokenizer, seed=1)
    with torch.no_grad():
        find_transformer_blocks(stranger)[0].self_attn.o_proj.weight.mul_(2.0)
    stored_prefix_states(stranger, ids, 1, tmp_path, pad_token_id=pad)
    stored_prefix_states(model, ids[:5], 1, tmp_path, pad_token_id=pad)  # one block, 5 of the rows
    computed_rows = count_computed_rows(monkeypatch)
    # Two blocks (the head alone trained): the 5 rows go on from block 1, the others from the embeddings.
    states, read, continued = stored_prefix_states(model, ids, 0, tmp_path, pad_token_id=pad)
    assert (read, continued) == (0, 5) and sorted(computed_rows) == sorted(map(tuple, ids[5:]))
    for got, want in zip(states, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(list(tmp_path.glob(f"*/{prefix_store.DESCRIPTION_FILE}"))) == 3
    computed_rows.clear()
    _, read, continued = stored_prefix_states(model, ids, 0, tmp_path, pad_token_id=pad)
    assert (read, continued, computed_rows) == (len(ids), 0, [])


def test_the_memory_limit_counts_rows_read_from_the_directory_too(tiny_phi3, tmp_path):
    path = str(tiny_phi3)
    tokenizer = load_tokenizer(path)
    model = fresh_model(path, tokenizer).eval()
    ids = encode_prompts(tokenizer, prompts_for(tokenizer), 64)
    stored_prefix_states(model, ids, 1, tmp_path, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(PrefixCacheTooLarge, match="over the limit"):
        stored_prefix_states(model, ids, 1, tmp_path, pad_token_id=tokenizer.pad_token_id, max_cache_bytes=1000)


def test_the_fingerprint_follows_the_frozen_prefix_and_nothing_else(tiny_phi3):
    path = str(tiny_phi3)
    tokenizer = load_tokenizer(path)
    model = fresh_model(path, tokenizer, seed=0)
    fingerprint = prefix_fingerprint(model, 1)
    assert len(fingerprint) == 64
    # Another head (seed), and the top block changed: the prefix is the same.
    other = fresh_model(path, tokenizer, seed=1)
    assert not torch.equal(other.score.weight, model.score.weight)
    with torch.no_grad():
        find_transformer_blocks(other)[-1].mlp.down_proj.weight.add_(1.0)
    assert prefix_fingerprint(other, 1) == fingerprint
    # The top block is in the prefix of a run that trains none of the blocks.
    assert prefix_fingerprint(other, 0) != prefix_fingerprint(model, 0)
    # Another number of cached blocks, or a changed weight below them: another fingerprint.
    assert prefix_fingerprint(model, 2) != fingerprint
    with torch.no_grad():
        find_transformer_blocks(other)[0].self_attn.o_proj.weight.mul_(1.001)
    assert prefix_fingerprint(other, 1) != fingerprint


def test_a_second_run_reads_every_row_and_gets_the_same_result(tiny_phi3, toy_files, tmp_path, capsys):
    store = tmp_path / "prefix-cache"
    metrics = []
    for run in ("first", "second"):
        flags = fast_training_flags(tiny_phi3, toy_files, tmp_path / run, *RECIPE, "--prefix-cache-dir", str(store))
        assert train_main("lora", flags) == 0
        metrics.append(json.loads((tmp_path / run / "metrics.json").read_text()))
        metadata = json.loads((tmp_path / run / "safety_classifier.json").read_text())
        assert 0 <= metadata["prefix_cache_seconds"] <= metadata["training_seconds"]
        output = capsys.readouterr().out
        if run == "first":
            assert "caching frozen prefix (train): 0 of" in output
        else:
            lines = [line for line in output.splitlines() if "rows read from" in line]
            assert len(lines) == 2 and all(line.split(": ")[1].split(" of ")[0] ==
                                           line.split(" of ")[1].split(" rows")[0] for line in lines), lines
    for split in ("validation", "test"):
        assert flat_metrics(metrics[1][split]) == pytest.approx(flat_metrics(metrics[0][split]), abs=TOLERANCE)


def test_a_prefix_cache_dir_without_the_cache_is_refused_as_it_is_parsed(tmp_path, capsys):
    flags = ["--model", str(tmp_path / "no-such-model"), "--train-file", str(tmp_path / "no-such.csv"),
             "--output-dir", str(tmp_path / "out"), "--lora-layers", "top:1", "--no-cache-prefix",
             "--prefix-cache-dir", str(tmp_path / "cache")]
    assert train_main("lora", flags) == 2
    assert "error: --prefix-cache-dir keeps the prefix cache" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    flags = flags[:-3] + ["--prefix-cache-dir", str(tmp_path / "a-file")]
    assert train_main("full_layers", [f for f in flags if f not in ("--lora-layers", "top:1")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert parse_training_plan("lora", flags[:-2] + ["--prefix-cache-dir", "x"]).prefix_cache_dir == "x"
    assert not (tmp_path / "out").exists()
