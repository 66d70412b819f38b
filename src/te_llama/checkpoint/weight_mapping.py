"""Names of Llama weights in Hugging Face checkpoints and in te-llama models: one table, the reverse derived.

``{}`` stands for the layer index. ``None`` marks checkpoint keys that are dropped (buffers old HF versions
saved). TE keeps the MLP's gate and up projections in one ``fc1_weight`` (gate rows first); :data:`FUSED`
lists its parts, and :func:`split_fused` / :func:`merge_fused` convert. Functions here are pure: state dict in,
state dict out.
"""

from __future__ import annotations

import re

import torch

ATTN = "model.layers.{}.self_attention."
MLP = "model.layers.{}.layernorm_mlp."

HF_TO_TE: dict[str, str | None] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": ATTN + "layernorm_qkv.layer_norm_weight",
    "model.layers.{}.self_attn.q_proj.weight": ATTN + "layernorm_qkv.query_weight",
    "model.layers.{}.self_attn.k_proj.weight": ATTN + "layernorm_qkv.key_weight",
    "model.layers.{}.self_attn.v_proj.weight": ATTN + "layernorm_qkv.value_weight",
    "model.layers.{}.self_attn.q_proj.bias": ATTN + "layernorm_qkv.query_bias",
    "model.layers.{}.self_attn.k_proj.bias": ATTN + "layernorm_qkv.key_bias",
    "model.layers.{}.self_attn.v_proj.bias": ATTN + "layernorm_qkv.value_bias",
    "model.layers.{}.self_attn.o_proj.weight": ATTN + "proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": ATTN + "proj.bias",
    "model.layers.{}.post_attention_layernorm.weight": MLP + "layer_norm_weight",
    "model.layers.{}.mlp.down_proj.weight": MLP + "fc2_weight",
    "model.layers.{}.mlp.down_proj.bias": MLP + "fc2_bias",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
}

FUSED: dict[str, tuple[str, ...]] = {
    MLP + "fc1_weight": ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
    MLP + "fc1_bias": ("model.layers.{}.mlp.gate_proj.bias", "model.layers.{}.mlp.up_proj.bias"),
}

TE_TO_HF: dict[str, str] = {te: hf for hf, te in HF_TO_TE.items() if te is not None}
FUSED_PART_OF: dict[str, tuple[str, int]] = {
    part: (fused, index) for fused, parts in FUSED.items() for index, part in enumerate(parts)
}

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


def hf_target(hf_key: str) -> tuple[str, int, int] | None:
    """Where an HF tensor goes: (TE key, part index, number of parts), or ``None`` for dropped keys.

    Unfused tensors are part 0 of 1. Raises :class:`WeightMappingError` for keys that are not Llama weights.
    """
    pattern, layer = generic(hf_key)
    if pattern in FUSED_PART_OF:
        fused, index = FUSED_PART_OF[pattern]
        return _fill(fused, layer), index, len(FUSED[fused])
    if pattern not in HF_TO_TE:
        raise WeightMappingError(f"{hf_key!r} is not a Llama weight te-llama knows how to map")
    target = HF_TO_TE[pattern]
    return None if target is None else (_fill(target, layer), 0, 1)


def hf_names(te_key: str) -> tuple[str, ...]:
    """The HF key(s) a TE parameter is made of (two for fused tensors)."""
    pattern, layer = generic(te_key)
    if pattern in FUSED:
        return tuple(_fill(part, layer) for part in FUSED[pattern])
    if pattern not in TE_TO_HF:
        raise WeightMappingError(f"{te_key!r} is not a te-llama parameter with an HF name")
    return (_fill(TE_TO_HF[pattern], layer),)


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
def hf_to_te(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF Llama state dict to te-llama's parameter names, fusing gate and up projections."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in state_dict.items():
        target = hf_target(key)
        if target is None:
            continue
        te_key, index, parts = target
        if parts == 1:
            out[te_key] = tensor
        else:
            pending.setdefault(te_key, [None] * parts)[index] = tensor
    for te_key, tensors in pending.items():
        missing = [name for name, t in zip(hf_names(te_key), tensors) if t is None]
        if missing:
            raise WeightMappingError(f"{te_key} needs {', '.join(missing)}, which the state dict lacks")
        out[te_key] = merge_fused(tensors)
    return out


@torch.no_grad()
def te_to_hf(state_dict: dict[str, torch.Tensor], tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Rename a te-llama state dict to HF Llama names; drops TE's FP8 state and, if tied, ``lm_head.weight``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if is_te_extra_state(key) or (tie_word_embeddings and key == "lm_head.weight"):
            continue
        names = hf_names(key)
        tensors = split_fused(tensor, len(names)) if len(names) > 1 else (tensor,)
        out.update(zip(names, tensors))
    return out
