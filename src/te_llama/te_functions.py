"""Swapping a module-level function of Transformer Engine for te-llama's, once per process.

te-llama plugs into TE where TE's code calls a function of its own module by name: RoPE
(``multi_head_attention.apply_rotary_pos_emb``), SwiGLU's backward (``layernorm_mlp._act_func``) and the FP8 weight
cast of the cached weights (the modules' ``quantize_weight``). Replacing that module attribute changes what TE
calls without copying any of TE's code. The replacement keeps TE's function as ``.original`` and carries a marker
attribute, so installing twice changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger("te_llama")


def replace(module: ModuleType, name: str, wrap: Callable[[Callable], Callable], marker: str,
            otherwise: str) -> bool:
    """Set ``module.name`` to ``wrap(TE's function)`` unless already done. Returns whether te-llama's function is
    in place; ``False`` (with a warning ending in ``otherwise``, what then runs instead) when this TE version has
    no such function."""
    original = getattr(module, name, None)
    if original is None:
        logger.warning("%s has no %s in this TE version: %s", module.__name__, name, otherwise)
        return False
    if getattr(original, marker, False):
        return True
    replacement = wrap(original)
    setattr(replacement, marker, True)
    replacement.original = original
    setattr(module, name, replacement)
    return True
