"""The bytes a piece of work keeps alive, counted tensor by tensor: what `torch.cuda.max_memory_allocated`
would show, on real tensors or on fake ones (a GPU's memory measured without a GPU, see
scripts/memory_check.py).

`LiveBytes` is a dispatch mode: every storage an operation creates is counted once, rounded up as
the CUDA caching allocator rounds a block (512 B), and uncounted when it is freed; `peak` is the most
alive at once. Storages that existed before the mode was entered (the weights) are not counted, nor
are views of an operation's inputs.
`fused_attention` makes attention allocate what the fused kernels allocate (the output and a float32
logsumexp per query), where the math kernel would build the whole score matrix (fake CUDA tensors
fall back to it).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK_BYTES = 512  # the CUDA caching allocator's rounding of a block


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created while it is active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {
            value.untyped_storage()._cdata
            for value in tree_flatten((args, kwargs))[0]
            if isinstance(value, torch.Tensor)
        }
        for value in tree_flatten(output)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in inputs:
                self._count(value.untyped_storage())  # a new storage, not a view of an input
        return output

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._sizes:
            return
        size = -(-storage.nbytes() // BLOCK_BYTES) * BLOCK_BYTES
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        """From here on, the peak counts from what is alive now."""
        self.peak = self.live


def fused_scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """What flash / memory-efficient attention allocates: the output, and a float32 logsumexp per query
    (freed when the call returns). The values are not computed."""
    logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
    del logsumexp
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Within: torch's scaled_dot_product_attention allocates as the fused kernels do (for fake tensors)."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = fused_scaled_dot_product_attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original
