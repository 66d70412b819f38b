"""PEFT LoRA's contributions to one of TE's fused projections, as two matrix products.

TE computes q, k and v in one GEMM (``layernorm_qkv``) and gate and up in another (``fc1``). PEFT's LoRA module
around each HF-named site (:mod:`te_llama.model.adapters`) would add its share on its own: per site and adapter a
GEMM into the rank, a GEMM out of it, a multiplication by the scaling and an addition, each of the last three
reading and writing the site's whole output. PEFT also keeps its adapter weights in float32 on a bfloat16 model
(``autocast_adapter_dtype=True``, its default) and casts each site's input to float32 to match, so every one of
those passes moves twice the bytes, and the GEMMs run in float32.

Here the adapters of all sites that share one output ``[..., n]`` are computed at once, in the activations' dtype,
as mixed-precision training does for any weight (PEFT's float32 weights stay the trained masters; their bfloat16
casts are a few kilobytes):

    h   = x @ [A_1; A_2; ...]^T                 one GEMM into all ranks, [tokens, r_1 + r_2 + ...]
    out = out + h @ [s_1 B_1 | s_2 B_2 | ...]^T  one GEMM out of them, added to TE's output in its epilogue

with each ``B_i`` placed in the rows of its site's block (zeros elsewhere), ``s_i`` its scaling. The zeros cost
rank-sized FLOPs only. In float32 the result is PEFT's to rounding (``tests/test_peft_lora.py``).

A LoRA module this cannot express runs PEFT's own forward instead, added to its block: a merged module that is
disabled (its forward unmerges), LoRA with a trained bias on B (``lora_bias=True``), and modules with forward
hooks, as PEFT's per-row ``adapter_names`` installs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Site = tuple[nn.Module | None, int]
"""A LoRA module (``None``: no adapter on this block) and the width of its block of the shared output."""


def _terms(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float, nn.Module]] | None:
    """(A ``[r, in]``, B ``[out, r]``, scaling, dropout) of each active adapter of ``module``, or ``None`` where
    PEFT's own forward must run."""
    if module.merged or module._forward_hooks or module._forward_pre_hooks:
        return None
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        lora_b = module.lora_B[name]
        if getattr(lora_b, "bias", None) is not None:
            return None
        terms.append((module.lora_A[name].weight, lora_b.weight, module.scaling[name], module.lora_dropout[name]))
    return terms


def _passes_through(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout)
                                                 and (not dropout.training or dropout.p == 0))


def add_lora(output: torch.Tensor, x: torch.Tensor, sites: Sequence[Site]) -> torch.Tensor:
    """``output`` ``[..., n]`` plus the contributions of the LoRA modules of ``sites`` (their blocks, in order, span
    ``n``) to the input ``x`` ``[..., in]`` they all see."""
    total = output.shape[-1]
    dropouts, ranks, outs = [], [], []
    fallback = None  # the sum of PEFT's own forwards, each padded to the whole width
    offset = 0
    for module, width in sites:
        terms = None if module is None else _terms(module)
        if module is not None and terms is None:
            delta = F.pad(module(x), (offset, total - offset - width))
            fallback = delta if fallback is None else fallback + delta
        for a, b, scaling, dropout in terms or ():
            dropouts.append(dropout)
            ranks.append(a.to(x.dtype))
            # B scaled and placed in its block's rows; an autograd graph of a few kilobytes back to PEFT's weights.
            outs.append(F.pad((b * scaling).to(output.dtype), (0, 0, offset, total - offset - width)))
        offset += width
    if offset != total:
        raise ValueError(f"the sites' widths add up to {offset}, not the output's {total}")
    if ranks:
        flat = x.reshape(-1, x.shape[-1])
        if all(_passes_through(dropout) for dropout in dropouts):
            h = F.linear(flat, torch.cat(ranks))
        else:  # each adapter's own dropout of the input
            h = torch.cat([F.linear(dropout(flat), a) for dropout, a in zip(dropouts, ranks)], dim=-1)
        output = torch.addmm(output.reshape(-1, total), h.to(output.dtype), torch.cat(outs, dim=1).t(),
                             ).view(output.shape)
    return output if fallback is None else output + fallback
