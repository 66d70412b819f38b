"""FP8 weight casts once per weight update instead of once per forward.

In FP8, every training forward casts each decoder layer's weights to FP8 (and, for the backward, their transpose):
for Llama-3-8B that is milliseconds of memory traffic per forward. Between two optimizer steps the
weights do not change (the micro-batches of gradient accumulation; forward + backward passes without an
optimizer step), so one cast can serve them all. Transformer Engine supports this through ``is_first_microbatch``:
``True`` casts into a cached copy, ``False`` reuses the copy, ``None`` casts without caching.

:class:`FP8WeightCache` picks that argument for each training forward of a te-llama model, so the cached copy is
never stale:

- the weights count as changed after any ``torch.optim.Optimizer.step`` (of any optimizer, including
  ``te_llama.AdamW`` and third-party subclasses such as bitsandbytes'), after any in-place change the parameters'
  version counters see (``load_state_dict``, ``p.mul_()`` under ``no_grad``), when a parameter is replaced (a new
  storage), and when the FP8 recipe changes;
- unchanged since the cached cast -> ``False``; changed, with a cached copy to refresh -> ``True``; changed, no
  cached copy yet -> ``None`` (a plain cast, as without this module), unless the previous forward saw the same
  weights (a run that reuses them), which starts the cache (``True``). A run that steps its optimizer after every
  forward therefore never keeps a cached copy. The first cast of a run is never kept: delayed scaling casts it
  with scale 1, before any amax was recorded.

Only the row-wise FP8 copy is cached; each layer's backward makes the transpose from it and drops it
(:mod:`te_llama.training.weight_cache_rowwise`). CUDA graphs are recorded with TE's weight caching once a forward has found
the weights unchanged since the previous one (:meth:`FP8WeightCache.keeps_casts`; the graphs are recorded again
then), so runs that step their optimizer after every forward cast as without this module.

What it saves, and why only the row-wise copy is kept (caching both copies, as TE does, made the backward reserve
more memory than HF's BF16 step): ``docs/fp8.md``.

Off by default (``model.cache_fp8_weights = True`` turns it on), for two
reasons: a loop that changes the weights where neither an optimizer step nor a version counter sees it (below)
would train on a stale cast without any error, and with gradient accumulation the cached copy stays allocated
through the optimizer step (6.5 GiB for 8B parameters), where TE's per-step copies are freed by then.

Changes that neither an optimizer step nor a version counter sees, such as writes through ``param.data`` or raw
pointers outside an optimizer, need :meth:`FP8WeightCache.weights_changed`
(:meth:`te_llama.TELlamaForCausalLM.fp8_weights_changed`), or leave the cache off.
"""

from __future__ import annotations


from torch.optim.optimizer import register_optimizer_step_post_hook
from te_llama.training.fp8_weights import tensor_addresses

_optimizer_steps = 0
_hook = None


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """Optimizer steps taken in this process since the first :class:`FP8WeightCache` was made."""
    return _optimizer_steps


def _watch_optimizers() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count_step)


class FP8WeightCache:
    """Chooses TE's ``is_first_microbatch`` for a model's training forwards (see the module docstring)."""

    def __init__(self, params):
        _watch_optimizers()
        self.params = tuple(params)
        self._cached = None  # the weights' state when the cached copy was last written
        self._previous = None  # their state at the previous forward without a cache
        self.reuses = 0
        """Forwards that reused the cached FP8 weights instead of casting."""

    def _state(self, recipe) -> tuple:
        # The recipe's id decides (another recipe object is another cast); the object rides along so that a kept
        # state keeps it alive and a new recipe cannot take over its id.
        return (optimizer_steps(), sum(p._version for p in self.params),
                sum(address for p in self.params for address in tensor_addresses(p)), id(recipe), recipe)

    def keeps_casts(self, recipe) -> bool:
        """Whether the next training forward under ``recipe`` keeps or reuses a cached cast (``is_first_microbatch``
        would not be ``None``): some forward found the weights unchanged since the one before it."""
        return self._cached is not None or self._state(recipe) == self._previous

    def is_first_microbatch(self, recipe, always_cache: bool = False) -> bool | None:
        """TE's argument for the next training forward under ``recipe``. ``always_cache``: never ``None`` (a CUDA
        graph recorded with weight caching needs a bool)."""
        state = self._state(recipe)
        if state == self._cached:
            self.reuses += 1
            return False
        # Keep a cast only of weights a previous forward has seen, or to refresh a kept one: delayed scaling's
        # first cast uses scale 1 (no amax history yet), and a kept cast would carry that coarse scale along.
        if self._cached is not None or state == self._previous:
            self._cached, self._previous = state, None
            return True
        self._previous = state
        return True if always_cache else None

    def weights_changed(self) -> None:
        """Cast the weights again at the next forward (after changes no optimizer step or version counter saw)."""
        if self._cached is not None:
            self._cached = ("stale",)  # equals no state: the next forward refreshes the copy
        self._previous = None
