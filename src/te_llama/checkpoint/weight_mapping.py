"""Names of weights in Hugging Face checkpoints and in te-llama models: one table per model family, the reverse
derived.

``{}`` stands for the layer index. ``None`` marks checkpoint keys that are dropped (buffers old HF versions
saved). TE keeps the MLP's gate and up projections in one ``fc1_weight`` (gate rows first); a table's ``fused``
lists its parts, and :func:`split_fused` / :func:`merge_fused` convert. The families share one set of names and
differ only in which biases and norms they have: Mistral has none of Llama's optional biases, Qwen2 has q/k/v
biases only, Qwen3 adds the per-head q/k norms. Functions here are pure: state dict in, state dict out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

ATTN = "model.layers.{}.self_attention."
MLP = "model.layers.{}.layernorm_mlp."
HF_LAYER = "model.layers.{}."


@dataclass(frozen=True)
class WeightTable:
    """One family's names: HF key -> TE key (``None``: dropped) and TE's fused tensors -> their HF parts."""

    family: str
    hf_to_te: Mapping[str, str | None]
    fused: Mapping[str, tuple[str, ...]]
    te_to_hf: Mapping[str, str] = field(init=False, repr=False)
    fused_part_of: Mapping[str, tuple[str, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "te_to_hf", {te: hf for hf, te in self.hf_to_te.items() if te is not None})
        object.__setattr__(self, "fused_part_of", {part: (fused, index) for fused, parts in self.fused.items()
                                                   for index, part in enumerate(parts)})


SHARED: dict[str, str | None] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    HF_LAYER + "input_layernorm.weight": ATTN + "layernorm_qkv.layer_norm_weight",
    HF_LAYER + "self_attn.q_proj.weight": ATTN + "layernorm_qkv.query_weight",
    HF_LAYER + "self_attn.k_proj.weight": ATTN + "layernorm_qkv.key_weight",
    HF_LAYER + "self_attn.v_proj.weight": ATTN + "layernorm_qkv.value_weight",
    HF_LAYER + "self_attn.o_proj.weight": ATTN + "proj.weight",
    HF_LAYER + "post_attention_layernorm.weight": MLP + "layer_norm_weight",
    HF_LAYER + "mlp.down_proj.weight": MLP + "fc2_weight",
    HF_LAYER + "self_attn.rotary_emb.inv_freq": None,
}
QKV_BIAS = {
    HF_LAYER + "self_attn.q_proj.bias": ATTN + "layernorm_qkv.query_bias",
    HF_LAYER + "self_attn.k_proj.bias": ATTN + "layernorm_qkv.key_bias",
    HF_LAYER + "self_attn.v_proj.bias": ATTN + "layernorm_qkv.value_bias",
}
O_BIAS = {HF_LAYER + "self_attn.o_proj.bias": ATTN + "proj.bias"}
QK_NORM = {  # TE's MultiheadAttention(qk_norm_type="RMSNorm") keeps them as q_norm / k_norm, one weight per head dim
    HF_LAYER + "self_attn.q_norm.weight": ATTN + "q_norm.weight",
    HF_LAYER + "self_attn.k_norm.weight": ATTN + "k_norm.weight",
}
GATE_UP = {MLP + "fc1_weight": (HF_LAYER + "mlp.gate_proj.weight", HF_LAYER + "mlp.up_proj.weight")}
MLP_BIAS_FUSED = {MLP + "fc1_bias": (HF_LAYER + "mlp.gate_proj.bias", HF_LAYER + "mlp.up_proj.bias")}
DOWN_BIAS = {HF_LAYER + "mlp.down_proj.bias": MLP + "fc2_bias"}

LLAMA = WeightTable("Llama", {**SHARED, **QKV_BIAS, **O_BIAS, **DOWN_BIAS}, {**GATE_UP, **MLP_BIAS_FUSED})
MISTRAL = WeightTable("Mistral", SHARED, GATE_UP)
QWEN2 = WeightTable("Qwen2", {**SHARED, **QKV_BIAS}, GATE_UP)
QWEN3 = WeightTable("Qwen3", {**SHARED, **QKV_BIAS, **O_BIAS, **QK_NORM}, GATE_UP)

# Llama's table under the names it had before there were families.
HF_TO_TE, FUSED, TE_TO_HF, FUSED_PART_OF = LLAMA.hf_to_te, LLAMA.fused, LLAMA.te_to_hf, LLAMA.fused_part_of

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class WeightMappingError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def generic(key: str) -> tuple[str, str | None]:
    """``model.layers.7.x`` -> (``model.layers.{}.x``, ``"7"``); other keys unchanged with ``None``."""
    match = _LAYER.match(key)
    if match is None:
        return key, None
    return _LAYER.sub("model.layers.{}.", key, count=1), match.group(1)


def _fill(pattern: str, layer: str | None) -> str:
    return pattern.format(layer) if layer is not None else pattern


def hf_target(hf_key: str, table: WeightTable = LLAMA) -> tuple[str, int, int] | None:
    """Where an HF tensor goes: (TE key, part index, number of parts), or ``None`` for dropped keys.

    Unfused tensors are part 0 of 1. Raises :class:`WeightMappingError` for keys that are not weights of the
    table's family.
    """
    pattern, layer = generic(hf_key)
    if pattern in table.fused_part_of:
        fused, index = table.fused_part_of[pattern]
        return _fill(fused, layer), index, len(table.fused[fused])
    if pattern not in table.hf_to_te:
        raise WeightMappingError(f"{hf_key!r} is not a {table.family} weight te-llama knows how to map")
    target = table.hf_to_te[pattern]
    return None if target is None else (_fill(target, layer), 0, 1)


def hf_names(te_key: str, table: WeightTable = LLAMA) -> tuple[str, ...]:
    """The HF key(s) a TE parameter is made of (two for fused tensors)."""
    pattern, layer = generic(te_key)
    if pattern in table.fused:
        return tuple(_fill(part, layer) for part in table.fused[pattern])
    if pattern not in table.te_to_hf:
        raise WeightMappingError(f"{te_key!r} is not a te-llama {table.family} parameter with an HF name")
    return (_fill(table.te_to_hf[pattern], layer),)


def split_fused(tensor: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """TE's fused tensor -> its HF parts (equal row blocks, gate first)."""
    return tensor.chunk(parts, dim=0)


def merge_fused(parts: list[torch.Tensor]) -> torch.Tensor:
    """HF parts (gate, up) -> TE's fused tensor."""
    return torch.cat(parts, dim=0)


def is_te_extra_state(key: str) -> bool:
    """TE's FP8 scaling state (``*._extra_state``), which never goes into HF checkpoints."""
    return key.endswith("_extra_state")


@torch.no_grad()
def hf_to_te(state_dict: dict[str, torch.Tensor], table: WeightTable = LLAMA) -> dict[str, torch.Tensor]:
    """Rename an HF state dict of the table's family to te-llama's parameter names, fusing gate and up."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in state_dict.items():
        target = hf_target(key, table)
        if target is None:
            continue
        te_key, index, parts = target
        if parts == 1:
            out[te_key] = tensor
        else:
            pending.setdefault(te_key, [None] * parts)[index] = tensor
    for te_key, tensors in pending.items():
        missing = [name for name, t in zip(hf_names(te_key, table), tensors) if t is None]
        if missing:
            raise WeightMappingError(f"{te_key} needs {', '.join(missing)}, which the state dict lacks")
        out[te_key] = merge_fused(tensors)
    return out


@torch.no_grad()
def te_to_hf(state_dict: dict[str, torch.Tensor], tie_word_embeddings: bool = False,
             table: WeightTable = LLAMA) -> dict[str, torch.Tensor]:
    """Rename a te-llama state dict to the HF names of the table's family; drops TE's FP8 state and, if tied,
    ``lm_head.weight``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if is_te_extra_state(key) or (tie_word_embeddings and key == "lm_head.weight"):
            continue
        names = hf_names(key, table)
        tensors = split_fused(tensor, len(names)) if len(names) > 1 else (tensor,)
        out.update(zip(names, tensors))
    return out
