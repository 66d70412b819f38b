"""Every change te-llama makes inside Transformer Engine, in one place.

te-llama changes TE's behaviour where TE's own code calls a function of its module by name: replacing that module
attribute changes what TE calls without copying TE's code. Each replacement

- is installed explicitly (:func:`install`, called where its feature is switched on) and undone by :func:`remove`;
- is checked against the TE versions it was tested with (:data:`TESTED_TE`): outside them it is not installed, TE's
  own code runs, and the log says so once;
- changes only what te-llama asks for: a replacement acts on the calls of te-llama's models that opted in (a mark on
  the model's FP8 recipe, or a forward running under :func:`rowwise_weight_cache_scope`) and hands every other call
  to TE's function unchanged, so other TE models in the process are not affected.

What each one does and why: ``docs/internals.md``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

logger = logging.getLogger("te_llama")

TESTED_TE = ">=2.20,<2.21"
"""The Transformer Engine versions whose internals the replacements below were written and tested against."""


@dataclass(frozen=True)
class Replacement:
    """``module.attribute`` of TE replaced by ``wrap(TE's function)`` in each of ``modules``."""

    modules: tuple[str, ...]
    attribute: str
    wrap: Callable[[Callable], Callable]
    otherwise: str  # what runs when the replacement is not installed


def _fused_swiglu_backward(original: Callable) -> Callable:
    from te_llama.kernels.swiglu_backward import fused_swiglu_backward

    return fused_swiglu_backward(original)


def _rowwise_weight_cache(original: Callable) -> Callable:
    from te_llama.training.weight_cache_rowwise import rowwise_when_cached

    return rowwise_when_cached(original, lambda: _scope.rowwise)


REPLACEMENTS: dict[str, Replacement] = {
    # LayerNormMLP looks up an optional fused "activation backward + bias gradient + quantize" function per activation
    # and recipe; TE has none for SwiGLU (kernels/swiglu_backward.py).
    "swiglu_backward": Replacement(("transformer_engine.pytorch.module.layernorm_mlp",), "_act_func",
                                   _fused_swiglu_backward, "SwiGLU's FP8 backward runs TE's two kernels"),
    # The linear modules cast (or reuse) their FP8 weights through quantize_weight; cached weights then keep only the
    # row-wise copy (training/weight_cache_rowwise.py).
    "rowwise_weight_cache": Replacement(
        tuple(f"transformer_engine.pytorch.module.{name}" for name in ("linear", "layernorm_linear", "layernorm_mlp")),
        "quantize_weight", _rowwise_weight_cache, "cached FP8 weights keep both copies, as in TE"),
}

_MARKER = "_te_llama_replaces"
_lock = threading.Lock()
_said: set[str] = set()


class _Scope(threading.local):
    rowwise = False


_scope = _Scope()


def te_version() -> str | None:
    """The installed Transformer Engine's version (imports it), ``None`` where it cannot be imported."""
    try:
        import transformer_engine
    except ImportError:
        return None
    return getattr(transformer_engine, "__version__", None)


def tested(version: str | None) -> bool:
    """Whether ``version`` of Transformer Engine is one the replacements were tested with (:data:`TESTED_TE`)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return version is not None and Version(version) in SpecifierSet(TESTED_TE)
    except InvalidVersion:
        return False


def _say_once(name: str, message: str) -> None:
    if name not in _said:
        _said.add(name)
        logger.warning("%s", message)


def install(name: str) -> bool:
    """Put replacement ``name`` in place (idempotent). Returns whether it is in place: ``False``, said once in the log,
    when this TE version is outside :data:`TESTED_TE` or lacks the attribute."""
    replacement = REPLACEMENTS[name]
    version = te_version()
    if not tested(version):
        _say_once(name, f"Transformer Engine {version} is outside the versions te-llama's {name} replacement was "
                        f"tested with ({TESTED_TE}): {replacement.otherwise}")
        return False
    with _lock:
        modules = [importlib.import_module(module) for module in replacement.modules]
        missing = [module.__name__ for module in modules if not callable(getattr(module, replacement.attribute, None))]
        if missing:
            _say_once(name, f"{', '.join(missing)} has no {replacement.attribute} in Transformer Engine {version}: "
                            f"{replacement.otherwise}")
            return False
        for module in modules:
            original = getattr(module, replacement.attribute)
            if getattr(original, _MARKER, None) == name:
                continue
            wrapped = replacement.wrap(original)
            setattr(wrapped, _MARKER, name)
            wrapped.original = original
            setattr(module, replacement.attribute, wrapped)
            logger.info("replaced Transformer Engine's %s.%s (%s; te_llama.te_patches.remove(%r) undoes it)",
                        module.__name__.removeprefix("transformer_engine.pytorch."), replacement.attribute, name, name)
    return True


def remove(name: str) -> None:
    """Give TE its own function back (a no-op where ``name`` is not installed)."""
    replacement = REPLACEMENTS[name]
    with _lock:
        for module_name in replacement.modules:
            module = sys.modules.get(module_name)
            current = getattr(module, replacement.attribute, None)
            if getattr(current, _MARKER, None) == name:
                setattr(module, replacement.attribute, current.original)


def installed(name: str) -> bool:
    """Whether replacement ``name`` is in place in all of its TE modules."""
    replacement = REPLACEMENTS[name]
    return all(getattr(getattr(sys.modules.get(module), replacement.attribute, None), _MARKER, None) == name
               for module in replacement.modules)


@contextlib.contextmanager
def rowwise_weight_cache_scope(active: bool = True) -> Iterator[None]:
    """Within this block (a te-llama forward with its FP8 weight cache on), cached per-tensor FP8 weights keep only
    their row-wise copy, where ``rowwise_weight_cache`` is installed."""
    previous, _scope.rowwise = _scope.rowwise, active
    try:
        yield
    finally:
        _scope.rowwise = previous
