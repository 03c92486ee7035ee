"""The service process's memory: glibc's malloc arenas and free heap, and the model file's pages.

Without these the process keeps growing under traffic after `/ready`; with them `/ready`
reports about the memory the service then keeps.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Any

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at `count`; True if applied.

    glibc gives threads that allocate at once arenas of their own (up to 8 per core), and memory
    freed in one arena is not reused by the others: with the event loop, the tokenizer thread and
    the model thread each allocating, the process kept growing. Must run before those threads allocate.
    """
    if count <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _glibc()
    return bool(libc.mallopt(M_ARENA_MAX, count)) if libc is not None else False


def trim_free_heap() -> bool:
    """Give the free pages inside glibc's heaps back to the system (`malloc_trim(0)`); True if any were.

    glibc keeps what a forward pass frees for reuse, and each new mix of batch shapes grows its
    heaps a little more; trimming after each batch returns what the batch freed, for a walk over
    the free lists."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def page_in_weights(model: Any) -> int:
    """Read every CPU weight and buffer of `model` once; the bytes read.

    `from_pretrained` memory-maps safetensors weights, and a page of the file joins the process
    only when read: a forward pass reads only the embedding rows of the tokens it sees, so traffic
    would otherwise page the embedding table in a page at a time after `/ready`."""
    import torch

    read = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.sum()
                read += tensor.numel() * tensor.element_size()
    return read


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (musl has neither mallopt's arenas nor malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
