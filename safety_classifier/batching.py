"""Training batches that fill a token budget instead of a fixed number of rows.

ToxicChat prompts are short (median ~15 tokens) and a few are long (up to the max length): eight
rows a batch make matrix products of ~120 rows, which a CPU multiplies far below its peak.
Batches of as many length-grouped rows as fit in `max_batch_tokens` (rows x longest row, what a
padded batch costs) keep every step near the same, efficient size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .inference import token_budget_batches


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Length-grouped batches within a token budget, in a seeded random order that changes each epoch.

    Each epoch the rows are sorted by length, rows of equal length in a random order (seed +
    epoch), and cut into batches of at most `max_batch_tokens` padded tokens (a longer row gets a
    batch of its own). The batch count is then made a multiple of `num_shards` by halving the
    largest batches, so that every row is seen exactly once per epoch and, under `torchrun`, every
    rank takes the same number of steps. Runs of `num_shards` neighbouring batches (similar lengths,
    so similar cost) form one step and the order of the steps is shuffled.

    The sampler yields the global order; `accelerate` (through the `Trainer`) gives batch i to
    rank i % num_shards, so ranks get distinct batches. Batches depend only on the lengths, the
    seed and the epoch: a resumed run sees the same batches in the same order. The number of
    batches is the same in every epoch, as the `Trainer` needs.
    """

    def __init__(self, lengths: Sequence[int], max_batch_tokens: int, *, seed: int = 0, num_shards: int = 1,
                 max_batch_rows: int = 256):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, not {max_batch_tokens}")
        if len(lengths) < num_shards:
            raise ValueError(f"{len(lengths)} training rows cannot give a batch to each of {num_shards} processes")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_rows = int(max_batch_rows)
        self.seed = int(seed)
        self.num_shards = int(num_shards)
        self.epoch = 0
        self._num_batches = len(self._batches(np.random.default_rng(self.seed)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    @property
    def mean_rows_per_batch(self) -> float:
        return len(self.lengths) / self._num_batches

    def _batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        shuffled = rng.permutation(len(self.lengths))
        # Sorting is stable, so equal lengths keep the shuffled order: the cut points depend only on
        # the sorted lengths, which is why the batch count is the same in every epoch.
        batches = [shuffled[batch] for batch in
                   token_budget_batches(self.lengths[shuffled], self.max_batch_tokens, self.max_batch_rows)]
        while len(batches) % self.num_shards:
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            if len(batches[largest]) < 2:
                raise ValueError(f"{len(self.lengths)} rows cannot be split into a multiple of "
                                 f"{self.num_shards} batches")
            batch = batches[largest]
            batches[largest: largest + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = self._batches(rng)
        steps = [batches[i: i + self.num_shards] for i in range(0, len(batches), self.num_shards)]
        for step in rng.permutation(len(steps)):
            for batch in steps[step]:
                yield batch.tolist()
