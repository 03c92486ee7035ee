"""Frozen-prefix states kept on disk between runs (`--prefix-cache-dir DIR`).

The hidden states entering the top K blocks depend only on the frozen weights below them and on a
row's token ids. A run that trains another recipe, mixture, learning rate or seed on rows that an
earlier run cached reads their states instead of running the prefix again, and a resumed run does
not recompute them; only rows never seen before are computed (and then added).

Layout: ``DIR/<fingerprint>/<shard>.safetensors``. The fingerprint is a SHA-256 of what decides the
states: the backbone's class, its configuration (labels and names aside), the number of blocks in
the prefix, the storage dtype and the bytes of every parameter and buffer of the prefix (embeddings
and blocks below the trained ones). Each shard holds one tensor a row, ``[length, hidden]``, named
by the SHA-256 of the row's token ids. Shards are only ever added, each written under a temporary
name and renamed, so concurrent runs (or DDP ranks) never see half a file; two runs caching the
same new rows at once only store them twice.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .prefix_cache import (
    DEFAULT_MAX_CACHE_BYTES,
    CachedPrefixDataset,
    check_cache_size,
    prefix_fingerprint,
    prefix_hidden_states_from_ids,
)


def row_key(ids: Sequence[int]) -> str:
    """The name of a row's tensor: SHA-256 of its token ids as int64."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


class PrefixStateStore:
    """The shards of one prefix fingerprint under `directory`."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory) / fingerprint

    def load(self, keys: set[str]) -> dict[str, torch.Tensor]:
        """The stored states among `keys` (the others are absent)."""
        found: dict[str, torch.Tensor] = {}
        for shard in sorted(self.directory.glob("*.safetensors")) if self.directory.is_dir() else ():
            with safe_open(str(shard), framework="pt") as handle:
                for key in keys.intersection(handle.keys()).difference(found):
                    found[key] = handle.get_tensor(key)
        return found

    def add(self, states: dict[str, torch.Tensor]) -> Path | None:
        """Write `states` as a new shard (atomically); returns its path."""
        if not states:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        temporary, shard = self.directory / f".{name}.tmp", self.directory / f"{name}.safetensors"
        save_file({key: tensor.contiguous() for key, tensor in states.items()}, str(temporary))
        os.replace(temporary, shard)
        return shard


def stored_prefix_states(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    num_layers: int,
    directory: str | os.PathLike,
    *,
    pad_token_id: int,
    max_cache_bytes: int | None = DEFAULT_MAX_CACHE_BYTES,
    **compute_options,
) -> tuple[list[torch.Tensor], int]:
    """`prefix_hidden_states_from_ids`, reading the rows already in `directory` and adding the others.

    Returns (states in the order of `input_ids`, number of rows read from the directory). The
    memory check counts every row, read or computed, before anything is read or run.
    """
    check_cache_size(model, [len(ids) for ids in input_ids], max_cache_bytes)
    store = PrefixStateStore(directory, prefix_fingerprint(model, num_layers))
    keys = [row_key(ids) for ids in input_ids]
    found = store.load(set(keys))
    missing = sorted({key: index for index, key in enumerate(keys) if key not in found}.values())
    if missing:
        computed = prefix_hidden_states_from_ids(
            model, [input_ids[index] for index in missing], num_layers, pad_token_id=pad_token_id,
            max_cache_bytes=None, **compute_options,
        )
        new = {keys[index]: state for index, state in zip(missing, computed)}
        store.add(new)
        found.update(new)
    computed_keys = {keys[index] for index in missing}
    return [found[key] for key in keys], sum(key not in computed_keys for key in keys)


def build_cached_dataset(
    model: nn.Module,
    tokenizer,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[int] | Sequence[Sequence[float]],
    num_layers: int,
    max_batch_tokens: int | None = None,
    *,
    max_cache_bytes: int | None = DEFAULT_MAX_CACHE_BYTES,
    directory: str | os.PathLike | None = None,
    show_progress: bool = False,
    description: str = "caching frozen prefix",
) -> CachedPrefixDataset:
    """Cache the prefix states of rows already encoded as the recipe encodes them (reading and
    adding to `directory` where one is given), and keep the ids for pooling and length grouping."""
    options = dict(pad_token_id=tokenizer.pad_token_id, max_batch_tokens=max_batch_tokens,
                   show_progress=show_progress, description=description)
    if directory is None:
        states = prefix_hidden_states_from_ids(model, input_ids, num_layers, max_cache_bytes=max_cache_bytes, **options)
    else:
        states, read = stored_prefix_states(model, input_ids, num_layers, directory, max_cache_bytes=max_cache_bytes,
                                            **options)
        if show_progress:
            print(f"{description}: {read:,} of {len(states):,} rows read from {directory}", flush=True)
    return CachedPrefixDataset(states, labels, input_ids)


__all__ = ["PrefixStateStore", "build_cached_dataset", "row_key", "stored_prefix_states"]
