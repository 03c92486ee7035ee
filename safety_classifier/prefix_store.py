"""Frozen-prefix states kept on disk between runs (`--prefix-cache-dir DIR`).

The hidden states entering the top K blocks depend only on the frozen weights below them and on a
row's token ids. A run that trains another recipe, mixture, learning rate or seed on rows that an
earlier run cached reads their states instead of running the prefix again, and a resumed run does
not recompute them; only rows never seen before are computed (and then added).

Layout: ``DIR/<fingerprint>/<shard>.safetensors``. The fingerprint is a SHA-256 of what decides the
states: the backbone's class, its configuration (labels and names aside), the number of blocks in
the prefix, the storage dtype and the bytes of every parameter and buffer of the prefix (embeddings
and blocks below the trained ones). Each shard holds one tensor a row, ``[length, hidden]``, named
by the SHA-256 of the row's token ids, and ``prefix.json`` says how many blocks the prefix has.
Shards are only ever added, each written under a temporary name and renamed, so concurrent runs
(or DDP ranks) never see half a file; two runs caching the same new rows at once only store them
twice.

A row missing from its own fingerprint but stored for a shallower prefix of the same frozen
weights (a run with more trained blocks: `top:8` before `top:4`) is continued from there through
the blocks in between instead of from the embeddings, so a search over K pays the prefix's forward
pass about once.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .modeling import find_transformer_blocks, unwrap_adapters
from .prefix_cache import (
    DEFAULT_MAX_CACHE_BYTES,
    CachedPrefixDataset,
    check_cache_size,
    continue_prefix_states,
    prefix_fingerprint,
    prefix_hidden_states_from_ids,
)

DESCRIPTION_FILE = "prefix.json"


def row_key(ids: Sequence[int]) -> str:
    """The name of a row's tensor: SHA-256 of its token ids as int64."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


class PrefixStateStore:
    """The shards of one prefix fingerprint under `directory`."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str, prefix_blocks: int | None = None):
        self.directory = Path(directory) / fingerprint
        self.prefix_blocks = prefix_blocks

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
        description = self.directory / DESCRIPTION_FILE
        if self.prefix_blocks is not None and not description.exists():
            temporary = self.directory / f".{name}.json.tmp"
            temporary.write_text(json.dumps({"prefix_blocks": self.prefix_blocks}))
            os.replace(temporary, description)
        return shard


def shallower_stores(model: nn.Module, directory: str | os.PathLike, num_layers: int
                     ) -> Iterator[tuple[int, PrefixStateStore]]:
    """(their num_layers, store) of the stores under `directory` that hold a shallower prefix of this
    model's frozen weights, deepest first (checked by fingerprint, so other weights never match)."""
    total = len(find_transformer_blocks(unwrap_adapters(model)))
    candidates = []
    for description in Path(directory).glob(f"*/{DESCRIPTION_FILE}"):
        try:
            blocks = int(json.loads(description.read_text())["prefix_blocks"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if 0 < blocks < total - num_layers:
            candidates.append((blocks, description.parent.name))
    for blocks, fingerprint in sorted(candidates, reverse=True):
        if prefix_fingerprint(model, total - blocks) == fingerprint:
            yield total - blocks, PrefixStateStore(directory, fingerprint, blocks)


def stored_prefix_states(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    num_layers: int,
    directory: str | os.PathLike,
    *,
    pad_token_id: int,
    max_cache_bytes: int | None = DEFAULT_MAX_CACHE_BYTES,
    max_batch_tokens: int | None = None,
    show_progress: bool = False,
    description: str = "caching frozen prefix",
) -> tuple[list[torch.Tensor], int, int]:
    """`prefix_hidden_states_from_ids`, reading the rows already in `directory` and adding the others.

    Returns (states in the order of `input_ids`, rows read, rows continued from a shallower prefix).
    The memory check counts every row, read or computed, before anything is read or run.
    """
    check_cache_size(model, [len(ids) for ids in input_ids], max_cache_bytes)
    total = len(find_transformer_blocks(unwrap_adapters(model)))
    store = PrefixStateStore(directory, prefix_fingerprint(model, num_layers), total - num_layers)
    keys = [row_key(ids) for ids in input_ids]
    found = store.load(set(keys))
    missing = {key: index for index, key in enumerate(keys) if key not in found}
    continued: set[str] = set()
    options = dict(max_batch_tokens=max_batch_tokens, show_progress=show_progress)
    for from_num_layers, shallower in shallower_stores(model, directory, num_layers) if missing else ():
        below = shallower.load(set(missing))
        if below:
            names = list(below)
            states = continue_prefix_states(model, [below[name] for name in names], from_num_layers, num_layers,
                                            description=f"{description}, from block {total - from_num_layers}",
                                            **options)
            new = dict(zip(names, states))
            store.add(new)
            found.update(new)
            continued.update(names)
            for name in names:
                del missing[name]
        if not missing:
            break
    if missing:
        indices = sorted(missing.values())
        states = prefix_hidden_states_from_ids(model, [input_ids[index] for index in indices], num_layers,
                                               pad_token_id=pad_token_id, max_cache_bytes=None,
                                               description=description, **options)
        new = {keys[index]: state for index, state in zip(indices, states)}
        store.add(new)
        found.update(new)
    read = sum(key not in missing and key not in continued for key in keys)
    return [found[key] for key in keys], read, sum(key in continued for key in keys)


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
        states, read, continued = stored_prefix_states(model, input_ids, num_layers, directory,
                                                       max_cache_bytes=max_cache_bytes, **options)
        if show_progress:
            print(f"{description}: {read:,} of {len(states):,} rows read from {directory}"
                  + (f", {continued:,} continued from a shallower prefix" if continued else ""), flush=True)
    return CachedPrefixDataset(states, labels, input_ids)


__all__ = ["PrefixStateStore", "build_cached_dataset", "row_key", "shallower_stores", "stored_prefix_states"]
