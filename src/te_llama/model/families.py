"""The model families te-llama runs, one :class:`Family` each: Llama, Mistral, Qwen2 (and Qwen2.5), Qwen3.

All four are Llama's decoder layer with differences that Transformer Engine's ``TransformerLayer`` expresses
through its arguments (:func:`te_kwargs`):

- Mistral: no biases; optionally sliding-window attention (``sliding_window=W``: query ``i`` sees keys
  ``i - W < j <= i``), which is TE's ``window_size=(W - 1, 0)`` (keys ``[i - left, i + right]``);
- Qwen2 / Qwen2.5: biases on q, k and v only. TE has one ``bias`` switch for all projections, so the layer turns it on
  and keeps the biases HF does not have as fixed zeros outside the parameters (:mod:`te_llama.model.layer`);
- Qwen3: a per-head RMSNorm on q and k (over ``head_dim``) before RoPE: ``qk_norm_type="RMSNorm"``,
  ``qk_norm_before_rope=True``; optionally biases on q, k, v and o (``attention_bias``).

Qwen2 and Qwen3 choose full or sliding attention per layer (``layer_types``, from ``use_sliding_window`` and
``max_window_layers``); te-llama runs configs whose layers all use the same one. A family also names HF's classes
and its weight-name table (:mod:`te_llama.checkpoint.weight_mapping`). :func:`check_config` refuses what te-llama's
layer cannot express, naming the field.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from te_llama.checkpoint import weight_mapping as names


class UnsupportedConfigError(ValueError):
    """A config field that te-llama's Transformer Engine layer cannot express."""


@dataclass(frozen=True)
class Biases:
    """Which of HF's projections have a bias: q/k/v, the attention output (o), the MLP (gate, up, down)."""

    qkv: bool = False
    proj: bool = False
    mlp: bool = False

    @property
    def te_switch(self) -> bool:
        """TE's one ``bias`` argument, which gives every projection a bias: on if any of HF's has one."""
        return self.qkv or self.proj or self.mlp


# Flags of other architectures that HF's classes of these families ignore; a config that sets one is not one of
# these models, and running it as one would compute something else.
_FOREIGN_FLAGS = ("use_qk_norm", "qk_norm", "qk_layernorm", "attn_logit_softcapping")


@dataclass(frozen=True)
class Family:
    """One model family: HF's names for it, its weight table, and what its config turns on in TE's layer."""

    model_type: str
    name: str
    """HF's class-name prefix: ``Mistral`` -> ``MistralForCausalLM``, ``MistralModel``, ``MistralDecoderLayer``."""
    weights: names.WeightTable
    biases: Callable[[Any], Biases]
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    sliding_window: bool = False
    """Whether HF's model reads ``config.sliding_window`` (Mistral; Qwen2 and Qwen3 through ``layer_types``)."""
    per_layer_attention: bool = False
    """Whether HF's model reads ``config.layer_types`` (full or sliding attention per layer)."""
    refused_flags: tuple[str, ...] = _FOREIGN_FLAGS

    @property
    def hf_module(self) -> ModuleType:
        """``transformers.models.<type>.modeling_<type>``, where HF's model looks up its submodules' classes."""
        return importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")

    def hf_class(self, suffix: str) -> type:
        """HF's ``<name><suffix>``: ``hf_class("ForCausalLM")`` is ``MistralForCausalLM`` for Mistral."""
        return getattr(self.hf_module, self.name + suffix)

    @property
    def config_class(self) -> type:
        module = importlib.import_module(f"transformers.models.{self.model_type}.configuration_{self.model_type}")
        return getattr(module, self.name + "Config")


LLAMA = Family("llama", "Llama", names.LLAMA,
               biases=lambda c: Biases(bool(c.attention_bias), bool(c.attention_bias), bool(c.mlp_bias)),
               refused_flags=(*_FOREIGN_FLAGS, "use_sliding_window"))
MISTRAL = Family("mistral", "Mistral", names.MISTRAL, biases=lambda c: Biases(), sliding_window=True,
                 refused_flags=(*_FOREIGN_FLAGS, "use_sliding_window"))
QWEN2 = Family("qwen2", "Qwen2", names.QWEN2, biases=lambda c: Biases(qkv=True),  # HF's Qwen2 hard-codes them
               sliding_window=True, per_layer_attention=True)
QWEN3 = Family("qwen3", "Qwen3", names.QWEN3,
               biases=lambda c: Biases(bool(c.attention_bias), bool(c.attention_bias)), qk_norm=True,
               sliding_window=True, per_layer_attention=True)

FAMILIES: dict[str, Family] = {family.model_type: family for family in (LLAMA, MISTRAL, QWEN2, QWEN3)}


def supported_model_types() -> str:
    return ", ".join(repr(model_type) for model_type in FAMILIES)


def family_for(model_type: str | None) -> Family:
    """The family of an HF ``model_type``; :class:`UnsupportedConfigError` for any other model."""
    if model_type not in FAMILIES:
        raise UnsupportedConfigError(f"model_type is {model_type!r}; te-llama runs the model types "
                                     f"{supported_model_types()}")
    return FAMILIES[model_type]


def family_of(config) -> Family:
    """The family of an HF config (by its ``model_type``)."""
    return family_for(getattr(config, "model_type", None))


def attention_window(config) -> int | None:
    """The sliding window ``W`` every layer uses (query ``i`` sees keys ``i - W < j <= i``), or ``None`` for full
    causal attention."""
    family = family_of(config)
    window = getattr(config, "sliding_window", None)
    if window is None or not family.sliding_window:
        return None
    if family.per_layer_attention:
        kinds = set(config.layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise UnsupportedConfigError(
                f"layer_types mixes full and sliding-window attention (use_sliding_window="
                f"{getattr(config, 'use_sliding_window', None)}, max_window_layers="
                f"{getattr(config, 'max_window_layers', None)}, {config.num_hidden_layers} layers): te-llama runs "
                "models whose layers all attend alike (use_sliding_window=false, or max_window_layers 0 or >= "
                "num_hidden_layers); run this one with transformers' own class")
    return int(window)


def check_config(config) -> Family:
    """The config's family; raises :class:`UnsupportedConfigError` naming the first field te-llama cannot express."""
    family = family_of(config)
    if config.hidden_act != "silu":
        raise UnsupportedConfigError(
            f"hidden_act={config.hidden_act!r}: TE's fused MLP implements SwiGLU, which needs 'silu'"
        )
    for flag in family.refused_flags:
        if getattr(config, flag, None):
            raise UnsupportedConfigError(f"{flag}={getattr(config, flag)!r} is not supported by te-llama's "
                                         f"{family.name} layer")
    if not family.sliding_window and getattr(config, "sliding_window", None) is not None:
        raise UnsupportedConfigError(f"sliding_window={config.sliding_window}: te-llama runs {family.name} with full "
                                     "causal attention, as HF's model does; remove the field")
    window = attention_window(config)
    if window is not None and window < 1:
        raise UnsupportedConfigError(f"sliding_window={window}: a window must hold at least the query itself (>= 1)")
    if config.num_attention_heads % config.num_key_value_heads:
        raise UnsupportedConfigError(
            f"num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={config.num_key_value_heads}"
        )
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedConfigError(f"pretraining_tp={config.pretraining_tp}: only 1 is supported")
    return family


def te_kwargs(config) -> dict[str, Any]:
    """The ``TransformerLayer`` arguments by which the config's family differs from plain Llama."""
    family = family_of(config)
    kwargs: dict[str, Any] = {"bias": family.biases(config).te_switch}
    window = attention_window(config)
    if window is not None:
        kwargs["window_size"] = (window - 1, 0)  # TE counts the keys before the query; HF's W includes the query
    if family.qk_norm:
        kwargs.update(qk_norm_type="RMSNorm", qk_norm_eps=config.rms_norm_eps, qk_norm_before_rope=True)
    return kwargs
