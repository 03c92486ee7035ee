"""Grouping rows into batches: training's token-budget sampler, scoring's padded batches and packs.

Short prompts in batches of a fixed number of rows make small matrix products, which a CPU
multiplies far below its peak. Batches of as many length-grouped rows as fit a token budget (rows
x longest row, what a padded batch costs) keep every pass near one efficient size. Training fills
the budget greedily (`token_budget_batches`, shuffled by `TokenBudgetBatchSampler`); scoring takes
the cheapest split under a cost model that charges every forward pass a fixed overhead
(`scoring_batches`), or packs the rows into single rows (`pack_rows`, run by `packing.py`),
whichever costs less (`scoring_plan`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_BATCH_ROWS = 256
"""The most rows in a batch or a pack, and the most texts a server gathers into one scoring call;
it also bounds `scoring_batches`' search to O(rows x MAX_BATCH_ROWS)."""
PASS_OVERHEAD_SHARE = 1 / 32
"""A forward pass costs about as much as this share of the budget in padded tokens besides its own
tokens (the weights are read once per pass): a rough estimate from timing single passes on a CPU."""
GPU_PASS_OVERHEAD_SHARE = 0.6
"""The same on a GPU, where an eager forward pass is mostly its fixed cost (most likely launching
each layer's kernels from Python), so fewer, fuller passes pay for more padding."""
MAX_PACK_TOKENS = 1024
"""Longest pack: on a CPU, longer packs score slower, their element-wise intermediates outgrowing the cache."""
PACKED_TOKEN_COST = 1.15
"""A packed token's cost in padded tokens: its attention runs span by span, and its element-wise
work on a longer row leaves the cache."""


def default_batch_tokens(device: torch.device) -> int:
    """Scoring batch budget: small on CPU, where small batches stay in the cache, large on GPU."""
    return 16384 if device.type == "cuda" else 2048


def pass_overhead_tokens(device: torch.device, max_batch_tokens: int) -> float:
    """What one more forward pass costs on `device`, in padded tokens of a `max_batch_tokens` budget."""
    return max_batch_tokens * (GPU_PASS_OVERHEAD_SHARE if device.type == "cuda" else PASS_OVERHEAD_SHARE)


def token_budget_batches(lengths: np.ndarray, max_batch_tokens: int,
                         max_batch_rows: int = MAX_BATCH_ROWS) -> list[np.ndarray]:
    """Group row indices longest first so that rows x longest row stays within the budget.

    Rows of similar length share a batch, so almost no compute goes to padding; a row longer
    than the budget gets a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, current, longest = [], [], 0
    for index in order:
        longest_if_added = max(longest, int(lengths[index]))
        if current and (longest_if_added * (len(current) + 1) > max_batch_tokens or len(current) >= max_batch_rows):
            batches.append(np.asarray(current))
            current, longest_if_added = [], int(lengths[index])
        current.append(index)
        longest = longest_if_added
    if current:
        batches.append(np.asarray(current))
    return batches


def scoring_batches(lengths: np.ndarray, max_batch_tokens: int, max_batch_rows: int = MAX_BATCH_ROWS,
                    overhead_tokens: float | None = None) -> list[np.ndarray]:
    """Row indices grouped for scoring: the cheapest split of the length-sorted rows into batches.

    Cost = padded tokens (rows x longest row) + `overhead_tokens` per forward pass (default: a CPU's
    `pass_overhead_tokens`), each batch within the budget (a longer row alone). Unlike the greedy
    fill of `token_budget_batches`, a few texts of mixed lengths (what a server gathers) are not
    padded to their longest: 500 + 3 x 30 tokens cost two passes, not 4 x 500. Batches of
    neighbours in length order are optimal for this cost, so a dynamic programme over split points
    finds the cheapest in O(rows x max_batch_rows).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    overhead = max_batch_tokens * PASS_OVERHEAD_SHARE if overhead_tokens is None else overhead_tokens
    order = np.argsort(-lengths, kind="stable")
    longest_first = lengths[order]
    count = len(order)
    cost = np.zeros(count + 1)
    start_of_last = np.zeros(count + 1, dtype=np.int64)
    for end in range(1, count + 1):
        # Batch = rows start..end-1; its longest is the row at `start` (sorted longest first).
        starts = np.arange(max(0, end - max_batch_rows), end)
        padded = (end - starts) * longest_first[starts]
        within = (padded <= max_batch_tokens) | (starts == end - 1)
        totals = np.where(within, cost[starts] + overhead + padded, np.inf)
        best = int(np.argmin(totals))
        cost[end], start_of_last[end] = totals[best], starts[best]
    batches, end = [], count
    while end:
        batches.append(order[start_of_last[end]:end])
        end = int(start_of_last[end])
    return batches[::-1]


def device_scoring_batches(lengths: np.ndarray, max_batch_tokens: int, device: torch.device) -> list[np.ndarray]:
    """`scoring_batches` priced for `device`: each pass costs what `pass_overhead_tokens` says it does there."""
    return scoring_batches(lengths, max_batch_tokens, overhead_tokens=pass_overhead_tokens(device, max_batch_tokens))


def pack_rows(lengths: np.ndarray, max_pack_tokens: int, max_pack_rows: int = MAX_BATCH_ROWS) -> list[np.ndarray]:
    """Row indices grouped into packs of at most `max_pack_tokens` real tokens (a longer row alone),
    longest rows first so that the packs' order, and so their scores, do not depend on input order."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    packs, current, total = [], [], 0
    for index in order:
        if current and (total + lengths[index] > max_pack_tokens or len(current) >= max_pack_rows):
            packs.append(np.asarray(current))
            current, total = [], 0
        current.append(index)
        total += int(lengths[index])
    if current:
        packs.append(np.asarray(current))
    return packs


def scoring_plan(lengths: np.ndarray, max_batch_tokens: int, pack: bool | None = None,
                 overhead_tokens: float | None = None) -> tuple[bool, list[np.ndarray]]:
    """(packed, row groups): padded batches (`scoring_batches`) or packs (`pack_rows`);
    with `pack=None`, whichever costs less.

    Cost, as in `scoring_batches`: padded tokens plus a pass overhead per forward pass; a packed
    token costs `PACKED_TOKEN_COST` padded ones. Thousands of prompts sorted by length (a file) pad
    little and stay padded; a few prompts of mixed lengths (a served batch) pack.
    """
    overhead = max_batch_tokens * PASS_OVERHEAD_SHARE if overhead_tokens is None else overhead_tokens
    batches = None if pack else scoring_batches(lengths, max_batch_tokens, overhead_tokens=overhead)
    packs = None if pack is False else pack_rows(lengths, min(max_batch_tokens, MAX_PACK_TOKENS))
    if pack is None:
        padded_cost = sum(len(batch) * int(lengths[batch].max()) for batch in batches) + overhead * len(batches)
        pack = PACKED_TOKEN_COST * int(lengths.sum()) + overhead * len(packs) < padded_cost
    return (True, packs) if pack else (False, batches)


def pad_rows(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[Sequence[int]],
             rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The rows' token ids, right-padded to the longest, with their attention mask."""
    return tokenizer.pad({"input_ids": [input_ids[i] for i in rows]}, return_tensors="pt")


def padded_batches(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[Sequence[int]],
                   max_batch_tokens: int, device: torch.device) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """`device_scoring_batches` of tokenized rows: (row indices, right-padded input_ids and attention_mask)."""
    lengths = np.asarray([len(ids) for ids in input_ids])
    for batch in device_scoring_batches(lengths, max_batch_tokens, device):
        yield batch, pad_rows(tokenizer, input_ids, batch)


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Length-grouped training batches within a token budget, in a seeded random order that changes each epoch.

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
                 max_batch_rows: int = MAX_BATCH_ROWS):
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
