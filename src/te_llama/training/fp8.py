"""FP8 recipes: one frozen config, one function that makes Transformer Engine's recipe, early validation.

``FP8Config(recipe="delayed")`` is DelayedScaling with the HYBRID format by default (E4M3 in the forward
pass, E5M2 for gradients). ``"current"`` is Float8CurrentScaling, ``"block"`` Float8BlockScaling (1x128 and
128x128 blocks, Hopper with CUDA 12.9+), ``"mxfp8"`` MXFP8BlockScaling (Blackwell), and ``"auto"`` the best
recipe the GPU supports (MXFP8 on Blackwell, delayed scaling on Hopper and Ada). Every check that can fail
fails here, before training starts, with a message that says what to change: asking for FP8 and getting
BF16 is impossible.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from te_llama.model.layer import head_dim

logger = logging.getLogger("te_llama")

RecipeName = Literal["auto", "delayed", "current", "block", "mxfp8"]
RECIPES: tuple[str, ...] = ("auto", "delayed", "current", "block", "mxfp8")
FP8_ALIGNMENT = 16


class FP8ConfigError(ValueError):
    """FP8 was asked for where it cannot run, or with settings TE cannot honour."""


@dataclass(frozen=True)
class FP8Config:
    """How te-llama runs its decoder layers in FP8.

    recipe: ``auto``, ``delayed``, ``current``, ``block`` or ``mxfp8``.
    fp8_format: ``hybrid`` (E4M3 forward, E5M2 backward) or ``e4m3`` (both). Block recipes use E4M3.
    amax_history_len / amax_compute_algo / margin: DelayedScaling's scale bookkeeping.
    in_eval: run ``model.eval()`` forwards (evaluation, ``generate()``) in FP8 too. Off by default: evaluation
        and generation run in BF16 and need no token count divisible by 16.
    backward_accumulation: ``split`` (default) or ``fast``: how the backward FP8 GEMMs (dgrad, wgrad) accumulate on
        Hopper and Ada. ``split`` promotes partial sums to float32 along the inner dimension, as TE does by default;
        ``fast`` keeps them in the tensor cores' shorter accumulator, as TE's forward GEMMs always do. ``fast`` is
        faster (more so under a power limit) and adds error that grows with the inner dimension; see the README's
        "Fast accumulation" for what it was measured to do. Delayed and current scaling only.
    """

    recipe: RecipeName = "auto"
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0
    in_eval: bool = False
    backward_accumulation: Literal["split", "fast"] = "split"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise FP8ConfigError(f"unknown FP8 recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}, or off "
                                 "(fp8=None) for no FP8")
        if self.fp8_format not in ("hybrid", "e4m3"):
            raise FP8ConfigError(f"fp8_format must be 'hybrid' or 'e4m3', got {self.fp8_format!r}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise FP8ConfigError(f"amax_compute_algo must be 'max' or 'most_recent', got {self.amax_compute_algo!r}")
        if self.amax_history_len < 1 or self.margin < 0:
            raise FP8ConfigError("amax_history_len must be >= 1 and margin >= 0")
        if self.backward_accumulation not in ("split", "fast"):
            raise FP8ConfigError(f"backward_accumulation must be 'split' or 'fast', got {self.backward_accumulation!r}")
        if self.recipe != "auto":  # auto is checked once resolved, on the GPU (te_recipe)
            _check_accumulation(self, self.recipe)


def _check_accumulation(config: FP8Config, name: str, chosen: str = "") -> None:
    """Fast backward accumulation exists for the delayed and current recipes only; ``chosen`` says how ``name``
    came about when the user did not name it."""
    if config.backward_accumulation == "fast" and name not in ("delayed", "current"):
        raise FP8ConfigError(f"backward_accumulation='fast' needs the delayed or current recipe; {name!r}{chosen} "
                             "GEMMs always accumulate in float32. Use recipe='delayed' or 'current', or 'split'.")


def parse_fp8(value: str | FP8Config | None, backward_accumulation: str = "split") -> FP8Config | None:
    """``None``/``"off"`` -> no FP8; a recipe name -> ``FP8Config(recipe=name, backward_accumulation=...)``; a
    config as is. Fast accumulation without FP8 is an error, not ignored."""
    if value is None or value in ("off", "none", "bf16", "false"):
        if backward_accumulation != "split":
            raise FP8ConfigError(f"--fp8-backward-accumulation {backward_accumulation} needs FP8, but FP8 is off "
                                 f"(--fp8 {value or 'auto on a machine without a GPU'}); use --fp8 delayed or current")
        return None
    if isinstance(value, FP8Config):
        return value
    return FP8Config(recipe=value, backward_accumulation=backward_accumulation)


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def resolve_recipe_name(config: FP8Config) -> str:
    """The concrete recipe for this GPU (``auto`` resolved)."""
    if config.recipe != "auto":
        return config.recipe
    return "mxfp8" if _capability() >= (10, 0) else "delayed"


def check_fp8_possible(backend: str, model_config=None) -> None:
    """Raise :class:`FP8ConfigError` unless FP8 can run here for this model."""
    if backend != "te":
        raise FP8ConfigError(
            "FP8 needs the Transformer Engine backend on an NVIDIA GPU, but this model uses the reference backend "
            "(pure PyTorch). Install TE on a GPU machine (pip install 'te-llama[te]') or turn FP8 off (fp8=None; "
            "--fp8 off on the command line)."
        )
    major, minor = _capability()
    if (major, minor) < (8, 9):
        raise FP8ConfigError(
            f"FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell); {torch.cuda.get_device_name()} is "
            f"{major}.{minor}. Turn FP8 off (fp8=None; --fp8 off on the command line) for BF16."
        )
    if model_config is not None:
        head = head_dim(model_config)
        sizes = {
            "hidden_size": model_config.hidden_size,
            "intermediate_size": model_config.intermediate_size,
            "num_attention_heads * head_dim": model_config.num_attention_heads * head,
            "num_key_value_heads * head_dim": model_config.num_key_value_heads * head,
        }
        bad = {name: size for name, size in sizes.items() if size % FP8_ALIGNMENT}
        if bad:
            listed = ", ".join(f"{name}={size}" for name, size in bad.items())
            raise FP8ConfigError(f"FP8 GEMMs need layer dimensions divisible by {FP8_ALIGNMENT}; this model has "
                                 f"{listed}. Turn FP8 off for this model (fp8=None; --fp8 off).")


def te_recipe(config: FP8Config):
    """Transformer Engine's recipe object for ``config`` on this GPU; raises if the GPU cannot run it."""
    from transformer_engine.common import recipe as te_recipes
    from transformer_engine.pytorch.quantization import check_recipe_support

    name = resolve_recipe_name(config)
    _check_accumulation(config, name, f" (what 'auto' chose on {torch.cuda.get_device_name()})")
    fmt = te_recipes.Format.HYBRID if config.fp8_format == "hybrid" else te_recipes.Format.E4M3
    if name == "delayed":
        recipe = te_recipes.DelayedScaling(fp8_format=fmt, amax_history_len=config.amax_history_len,
                                           amax_compute_algo=config.amax_compute_algo, margin=config.margin)
    elif name == "current":
        recipe = te_recipes.Float8CurrentScaling(fp8_format=fmt)
    elif name == "block":
        recipe = te_recipes.Float8BlockScaling(fp8_format=te_recipes.Format.E4M3)
    else:
        recipe = te_recipes.MXFP8BlockScaling(fp8_format=te_recipes.Format.E4M3)
    try:
        check_recipe_support(recipe)
    except RuntimeError as error:
        others = "delayed or current" if name in ("block", "mxfp8") else "--fp8 off"
        raise FP8ConfigError(f"FP8 recipe {name!r} is not supported on {torch.cuda.get_device_name()}: {error} "
                             f"Use {others}.") from error
    if config.backward_accumulation == "fast":
        # TE's Linear, LayerNormLinear and LayerNormMLP read these from whichever recipe is active (a field of
        # Float8CurrentScaling; on DelayedScaling, whose dataclass lacks them, an attribute of this object).
        fast = te_recipes.MMParams(use_split_accumulator=False)
        recipe.fp8_gemm_dgrad = recipe.fp8_gemm_wgrad = fast
    return recipe


def describe(config: FP8Config) -> str:
    """One line for logs and summaries, e.g. ``delayed (DelayedScaling, HYBRID: E4M3 fwd / E5M2 bwd)``."""
    name = resolve_recipe_name(config)
    kind = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "block": "Float8BlockScaling",
            "mxfp8": "MXFP8BlockScaling"}[name]
    fmt = "E4M3" if name in ("block", "mxfp8") or config.fp8_format == "e4m3" else "HYBRID: E4M3 fwd / E5M2 bwd"
    fast = ", fast backward accumulation" if config.backward_accumulation == "fast" else ""
    return f"{name} ({kind}, {fmt}{fast})"


def token_alignment(recipe_name: str) -> int:
    """What FP8 GEMMs need the token count of a batch to be divisible by: 16 (the backward's weight-gradient GEMMs
    take the tokens as their inner dimension, which cuBLAS wants a multiple of 16 in FP8), 32 for MXFP8."""
    return 32 if recipe_name == "mxfp8" else 16


def check_token_alignment(recipe_name: str, tokens: torch.Tensor) -> None:
    """FP8 GEMMs need the batch's token count divisible by 16 (32 for MXFP8); a clear error instead of TE's assert.
    Training, scoring and KV-cache forwards pad inside (:mod:`te_llama.model.packed`,
    :class:`te_llama.model.kv_cache.TokenRows`); this guards what neither sees (a 4-D attention mask of the caller's)."""
    alignment = token_alignment(recipe_name)
    if tokens is not None and tokens.numel() % alignment:
        raise FP8ConfigError(
            f"FP8 needs the number of tokens in a batch to be divisible by {alignment}; got "
            f"{tuple(tokens.shape)} = {tokens.numel()}. Pad sequences to a multiple of 16 (e.g. "
            "DataCollatorForLanguageModeling(..., pad_to_multiple_of=16)) or use fixed-length blocks.")


def autocast(recipe) -> contextlib.AbstractContextManager:
    """TE's FP8 autocast with ``recipe``, or nothing for ``None`` (BF16/FP32). For delayed scaling without
    gradients, see :func:`_updating_delayed_scales`."""
    if recipe is None:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    if recipe.delayed() and not torch.is_grad_enabled():
        return _updating_delayed_scales(te.autocast(enabled=True, recipe=recipe), recipe)
    return te.autocast(enabled=True, recipe=recipe)


@contextlib.contextmanager
def _updating_delayed_scales(te_autocast, recipe):
    """``te_autocast``, then delayed scaling's amax and scale update, which TE runs when an autocast ends only where
    gradients are enabled. Without it every no-grad FP8 forward (evaluation, ``generate()``) would cast with the
    scales of the last forward with gradients, or with scale 1 in a model never trained here: activations past 448
    saturate, small weights lose their precision. The update is the one TE's autocast makes (its amaxes go into the
    history that training reads next, as an evaluation with gradients would put them), on this process's amaxes
    alone: a no-grad forward may run in one process of several (a sample on the first), where an all-reduce would
    wait for the others for good."""
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    with te_autocast:
        yield
    if FP8GlobalStateManager.quantization_state.autocast_depth == 0:
        reduce, recipe.reduce_amax = recipe.reduce_amax, False
        try:
            FP8GlobalStateManager.reduce_and_update_fp8_tensors(forward=True)
        finally:
            recipe.reduce_amax = reduce
