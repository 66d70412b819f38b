"""HF's ``StaticCache`` under a recorded decode step: which caches a CUDA graph can serve, and the fixed memory their
keys and values live in.

``StaticLayer.update`` (transformers 5.17 and 5.25 alike) writes the new keys and values with ``index_copy_`` at
``arange(1) + cumulative_length``, a tensor on the cache's device, then adds to that length in place: no host sync
and no shape that depends on data, so a graph can record it. A graph reads and writes the layers' tensors at the
addresses they had while it was recorded, but those change: ``generate()`` makes a new ``StaticCache`` at every
call, and beam search's ``reorder_cache`` (``index_select``) or ``batch_select_indices`` give a layer new tensors.
So a recorded step keeps the tensors of the cache it was recorded on (:class:`CacheMemory`), and any other cache of
that shape is adopted before a replay: its contents are copied into that memory and its layers pointed at it. Under
beam search that is one copy of the cache per step, as much memory traffic as the reorder itself.
"""

from __future__ import annotations

import weakref

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer


def graph_reason(cache) -> str | None:
    """``None`` where a recorded decode step can run on ``cache``; otherwise why not (``""``: the cache holds nothing
    yet, the prefill is still to come, which is expected)."""
    if type(cache) is not StaticCache:
        return (f"the cache is a {type(cache).__name__}; decode graphs need HF's StaticCache "
                "(generate(..., cache_implementation='static'), or a StaticCache passed as past_key_values)")
    if getattr(cache, "offloading", False):
        return "the static cache is offloaded to the CPU between layers"
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer}
    if kinds:
        return (f"the static cache has layers of type {', '.join(sorted(kinds))} (a sliding window), whose "
                "updates depend on a length kept on the host")
    if not all(layer.is_initialized for layer in cache.layers):
        return ""
    return None


def cache_length(cache) -> int:
    """The number of tokens each layer of a static ``cache`` holds room for."""
    return cache.layers[0].keys.shape[2]


_STATE = ("keys", "values", "cumulative_length")
"""What a ``StaticLayer`` keeps on the device, each written in place by its ``update``."""


class CacheMemory:
    """The keys, values and lengths of every layer of the static cache a decode step was recorded on, which its graph
    reads and writes; and the cache that holds them now."""

    def __init__(self, cache):
        self.layers = [{name: getattr(layer, name) for name in _STATE} for layer in cache.layers]
        self._holder = weakref.ref(cache)

    @property
    def lengths(self) -> list[torch.Tensor]:
        return [tensors["cumulative_length"] for tensors in self.layers]

    def holds(self, cache) -> bool:
        return self._holder() is cache

    def adopt(self, cache) -> None:
        """Make ``cache`` (of this memory's shape) keep its keys, values and lengths in this memory, copying in what
        it holds wherever its layers point elsewhere (a new cache, or a beam-search reorder)."""
        if not self.holds(cache):
            self._release_holder()
            self._holder = weakref.ref(cache)
        for layer, tensors in zip(cache.layers, self.layers):
            for name, mine in tensors.items():
                if getattr(layer, name) is not mine:
                    setattr(layer, name, mine.copy_(getattr(layer, name)))

    def _release_holder(self) -> None:
        """Give the cache that held this memory copies of its own, so that a cache the caller kept (returned by
        ``generate()``, to continue from later) is not overwritten by the next cache's steps."""
        holder = self._holder()
        if holder is None:
            return
        for layer, tensors in zip(holder.layers, self.layers):
            for name, mine in tensors.items():
                if getattr(layer, name) is mine:
                    setattr(layer, name, mine.clone())
