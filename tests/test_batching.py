"""Token-budget training batches: the budget, every row once an epoch, exact resume, distinct rows per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from accelerate import Accelerator, skip_first_batches
from conftest import REPO_ROOT
from torch.utils.data import DataLoader

from safety_classifier.batching import TokenBudgetBatchSampler


def toxicchat_like_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Mostly short rows and a long tail, as ToxicChat's prompts are."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.lognormal(mean=2.8, sigma=1.1, size=count).astype(int) + 1, 512)


def set_epoch_like_the_trainer(loader, epoch: int) -> None:
    """`Trainer._run_epoch`: the loader's own set_epoch, and the batch sampler under accelerate's wrapper."""
    loader.set_epoch(epoch)
    inner = getattr(loader.batch_sampler, "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def epoch_batches(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batches_respect_the_budget_and_hold_every_row_once_an_epoch():
    lengths = toxicchat_like_lengths(1000)
    sampler = TokenBudgetBatchSampler(lengths, 2048, seed=3)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        rows = [row for batch in batches for row in batch]
        assert sorted(rows) == list(range(len(lengths)))
        for batch in batches:
            assert len(batch) * lengths[batch].max() <= 2048 or len(batch) == 1
    # Length-grouped: padding wastes little.
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() / padded > 0.8
    assert sampler.mean_rows_per_batch == pytest.approx(len(lengths) / len(sampler))


def test_a_row_longer_than_the_budget_gets_a_batch_of_its_own():
    lengths = np.array([5, 5, 300, 5, 40])
    batches = epoch_batches(TokenBudgetBatchSampler(lengths, 100, seed=0), 0)
    assert [2] in batches
    assert sorted(row for batch in batches for row in batch) == [0, 1, 2, 3, 4]


def test_the_order_is_reshuffled_each_epoch_and_repeats_with_the_seed():
    lengths = toxicchat_like_lengths(500)
    first, again = (TokenBudgetBatchSampler(lengths, 1024, seed=7) for _ in range(2))
    assert epoch_batches(first, 0) == epoch_batches(again, 0)
    assert epoch_batches(first, 1) == epoch_batches(again, 1)
    assert epoch_batches(first, 0) != epoch_batches(first, 1)
    assert epoch_batches(first, 0) != epoch_batches(TokenBudgetBatchSampler(lengths, 1024, seed=8), 0)


@pytest.mark.parametrize("num_shards", [2, 3])
def test_the_batch_count_is_a_multiple_of_the_processes_and_still_covers_every_row(num_shards):
    lengths = toxicchat_like_lengths(301, seed=num_shards)
    sampler = TokenBudgetBatchSampler(lengths, 512, seed=0, num_shards=num_shards)
    batches = epoch_batches(sampler, 0)
    assert len(batches) % num_shards == 0
    assert sorted(row for batch in batches for row in batch) == list(range(len(lengths)))


def test_too_few_rows_for_the_processes_is_an_error():
    with pytest.raises(ValueError, match="3 training rows"):
        TokenBudgetBatchSampler([4, 4, 4], 64, num_shards=4)


def test_a_resumed_epoch_continues_with_the_same_batches():
    """What the Trainer does on resume: the same epoch's loader, its first k batches skipped."""
    lengths = toxicchat_like_lengths(400)
    accelerator = Accelerator(cpu=True)

    def loader():
        sampler = TokenBudgetBatchSampler(lengths, 1024, seed=5)
        return accelerator.prepare(DataLoader(list(range(len(lengths))), batch_sampler=sampler,
                                              collate_fn=lambda rows: list(rows)))

    whole = loader()
    set_epoch_like_the_trainer(whole, 1)
    whole = list(whole)
    resumed = skip_first_batches(loader(), 5)
    set_epoch_like_the_trainer(resumed, 1)
    assert list(resumed) == whole[5:]
    assert whole != list(loader()), "epoch 1 differs from epoch 0"


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments
    from safety_classifier.batching import TokenBudgetBatchSampler
    from safety_classifier.trainer import ClassifierTrainer

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Linear(1, 2)
        def forward(self, input_ids=None, labels=None, **kwargs):
            return {"logits": self.score(input_ids[:, :1].float())}

    out = sys.argv[1]
    lengths = np.random.default_rng(0).integers(1, 60, size=203)
    dataset = Dataset.from_dict({"input_ids": [[row] * int(n) for row, n in enumerate(lengths)],
                                 "labels": [0] * len(lengths)})
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=1)
    sampler = TokenBudgetBatchSampler(lengths, 256, seed=11, num_shards=args.world_size)
    collate = lambda rows: {"input_ids": torch.tensor([[r["input_ids"][0]] for r in rows]),
                            "labels": torch.tensor([r["labels"] for r in rows])}
    trainer = ClassifierTrainer(model=Tiny(), args=args, train_dataset=dataset, data_collator=collate,
                                head_parameters=[], head_learning_rate=1e-3, train_batch_sampler=sampler)
    loader = trainer.get_train_dataloader()
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        loader.batch_sampler.batch_sampler.set_epoch(epoch)  # as Trainer._run_epoch does under accelerate's shard
        seen[epoch] = [batch["input_ids"][:, 0].tolist() for batch in loader]
    with open(f"{out}/rank{args.process_index}.json", "w") as handle:
        json.dump({"batches": seen, "length": len(loader), "world_size": args.world_size}, handle)
""")


def test_two_gloo_processes_get_distinct_batches_and_the_same_number_of_steps(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
         str(script), str(tmp_path)], capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["length"] == ranks[1]["length"] > 1
    for epoch in ("0", "1"):
        per_rank = [[row for batch in r["batches"][epoch] for row in batch] for r in ranks]
        assert len(ranks[0]["batches"][epoch]) == len(ranks[1]["batches"][epoch]) == ranks[0]["length"]
        assert not set(per_rank[0]) & set(per_rank[1]), "a row went to both ranks"
        assert sorted(per_rank[0] + per_rank[1]) == list(range(203)), "every row once an epoch"
    assert ranks[0]["batches"]["0"] != ranks[0]["batches"]["1"]


def test_validation_runs_in_length_sorted_batches_within_the_budget(tiny_phi3, toy_files, tmp_path):
    """The Trainer's own evaluation loader pads each row to the longest of 32 shuffled rows; ours
    cuts length-sorted rows at the training budget and covers every validation row once."""
    from conftest import fast_training_flags

    from safety_classifier.cli import parse_training_plan
    from safety_classifier.trainer import row_lengths
    from safety_classifier.training import build_training_session, load_training_splits

    flags = [flag for flag in fast_training_flags(tiny_phi3, toy_files, tmp_path / "run") if flag not in ("--batch-size", "8")]
    plan = parse_training_plan("lora", [*flags, "--max-batch-tokens", "64", "--lora-r", "4"])
    trainer = build_training_session(plan, load_training_splits(plan)).trainer
    lengths = row_lengths(trainer.eval_dataset)
    batches = [batch["input_ids"] for batch in trainer.get_eval_dataloader()]
    assert sum(len(batch) for batch in batches) == len(lengths)
    assert sorted(int(m.sum()) for b in trainer.get_eval_dataloader() for m in b["attention_mask"]) == sorted(lengths)
    for batch in batches:
        assert batch.shape[0] == 1 or batch.numel() <= 64, batch.shape
    assert [batch.shape[1] for batch in batches] == sorted((batch.shape[1] for batch in batches), reverse=True)


def test_the_default_recipe_trains_in_8_row_batches_and_a_token_budget_asks_for_budget_batches(tiny_phi3, toy_files,
                                                                                             tmp_path):
    """No batch flag: 8 length-grouped rows a batch (the recipe chosen on validation), the loss averaged
    per batch, and validation still in length-sorted batches within the scoring budget;
    --max-batch-tokens alone: token-budget training batches; --batch-size wins over it."""
    from conftest import fast_training_flags

    from safety_classifier.cli import parse_training_plan
    from safety_classifier.training import build_training_session, load_training_splits

    flags = [flag for flag in fast_training_flags(tiny_phi3, toy_files, tmp_path / "run") if flag not in ("--batch-size", "8")]
    default = parse_training_plan("lora", [*flags, "--lora-r", "4"])
    assert default.batch_rows == 8 and default.learning_rate == 4e-4 and default.head_learning_rate == 1e-3
    assert default.arguments_record()["batch_size"] == 8
    # Above the rank the rate was searched at (16), the default falls as 1 / sqrt(r); a given rate wins.
    assert parse_training_plan("lora", [*flags, "--lora-r", "64"]).learning_rate == pytest.approx(2e-4)
    assert parse_training_plan("qlora", [*flags, "--lora-r", "32"]).arguments_record()["learning_rate"] == \
        pytest.approx(4e-4 / 2 ** 0.5)
    assert parse_training_plan("lora", [*flags, "--lora-r", "64", "--learning-rate", "4e-4"]).learning_rate == 4e-4
    assert parse_training_plan("full_layers", flags).learning_rate == 3e-4
    assert parse_training_plan("lora", [*flags, "--max-batch-tokens", "64"]).batch_rows is None
    assert parse_training_plan("lora", [*flags, "--max-batch-tokens", "64", "--batch-size", "4"]).batch_rows == 4

    session = build_training_session(parse_training_plan("lora", [*flags, "--lora-r", "4", "--batch-size", "4",
                                                                  "--max-batch-tokens", "64"]),
                                     load_training_splits(default))
    assert session.sampler is None
    train_rows = [len(batch["input_ids"]) for batch in session.trainer.get_train_dataloader()]
    assert max(train_rows) == 4 and sum(train_rows) == len(session.trainer.train_dataset)
    evaluation = [batch["input_ids"] for batch in session.trainer.get_eval_dataloader()]
    assert all(batch.shape[0] == 1 or batch.numel() <= 64 for batch in evaluation), "scoring budget for validation"
    assert sum(len(batch) for batch in evaluation) == len(session.trainer.eval_dataset)
