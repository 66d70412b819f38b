"""What one ``te-llama bench`` row runs: a :class:`Variant`, read once from its command-line name.

The peers are fixed names (``hf_bf16``, ``hf_compile``, ``liger``, ``torchao_fp8``, and ``hf_bf16_lora``: HF + PEFT
LoRA). A te-llama variant's name is ``te_bf16`` or ``te_fp8_<recipe>``, then ``_fastacc`` (fast backward
accumulation, FP8 delayed or current only), ``_graphs`` (CUDA graphs), ``_cached`` (the FP8 weight cache),
``_lora`` (PEFT LoRA on the frozen base) and ``_fp8weights`` (FP8 LoRA with the frozen base kept in FP8 only,
:meth:`te_llama.TELlamaForCausalLM.quantize_frozen_weights`), in that order: ``te_fp8_delayed_fastacc_graphs_cached``,
``te_fp8_delayed_lora_fp8weights``. LoRA rows use :data:`LORA`, the same for HF and te-llama.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

RECIPES = ("delayed", "current", "block", "mxfp8")
PEERS = ("hf_bf16", "hf_compile", "liger", "torchao_fp8", "hf_bf16_lora")
COMPILED = ("hf_compile", "torchao_fp8")  # peers built with torch.compile: 3 more warm-up steps
BASELINE = "hf_bf16"
LORA_BASELINE = "hf_bf16_lora"
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
"""The adapters of every ``_lora`` row: rank 16 on all seven projections of each layer."""

_TE_NAME = re.compile(r"te_(?:bf16|fp8_(?P<recipe>[a-z0-9]+)(?P<fastacc>_fastacc)?)(?P<graphs>_graphs)?(?P<cached>_cached)?(?P<lora>_lora)?(?P<fp8weights>_fp8weights)?")


class BenchmarkArgumentError(ValueError):
    """An unknown shape or variant name."""


@dataclass(frozen=True)
class Variant:
    """One benchmark variant: a peer, or te-llama with its precision and run options."""

    name: str
    kind: Literal["peer", "te"]
    recipe: str | None = None  # te-llama's FP8 recipe; None: BF16
    fast_accumulation: bool = False
    cuda_graphs: bool = False
    weight_cache: bool = False
    lora: bool = False  # PEFT LoRA adapters (LORA) on the frozen base; the optimizer steps the adapters only
    fp8_weights: bool = False  # the frozen LoRA base kept in FP8 only

    @classmethod
    def parse(cls, name: str) -> Variant:
        """The variant a command-line name means; :class:`BenchmarkArgumentError` for one that means none."""
        if name in PEERS:
            return cls(name, "peer", lora=name == LORA_BASELINE)
        match = _TE_NAME.fullmatch(name)
        recipe = match and match["recipe"]
        if not match or (recipe is not None and recipe not in RECIPES) or (
                recipe is None and (match["cached"] or match["fastacc"] or match["fp8weights"])) or (
                match["fp8weights"] and not match["lora"]):
            raise BenchmarkArgumentError(
                f"unknown variant {name!r}: use one of {', '.join(PEERS)}, or te_bf16 or te_fp8_<recipe> "
                f"({', '.join(RECIPES)}) followed by _fastacc (FP8), _graphs, _cached (FP8), _lora, _fp8weights (FP8 "
                "LoRA), in that order")
        return cls(name, "te", recipe, bool(match["fastacc"]), bool(match["graphs"]), bool(match["cached"]),
                   bool(match["lora"]), bool(match["fp8weights"]))

    @property
    def is_te(self) -> bool:
        return self.kind == "te"

    @property
    def baseline(self) -> str:
        """The HF row this row's ratios are against: HF + PEFT for LoRA rows, HF BF16 otherwise."""
        return LORA_BASELINE if self.lora else BASELINE

    @property
    def compiled(self) -> bool:
        return self.name in COMPILED

    def fp8_config(self):
        """The :class:`~te_llama.training.fp8.FP8Config` of a te-llama FP8 variant, ``None`` otherwise; raises
        :class:`~te_llama.training.fp8.FP8ConfigError` for a combination FP8 cannot run (``te_fp8_block_fastacc``)."""
        from te_llama.training.fp8 import FP8Config

        if self.recipe is None:
            return None
        return FP8Config(recipe=self.recipe, backward_accumulation="fast" if self.fast_accumulation else "split")


def is_variant(name: str) -> bool:
    try:
        Variant.parse(name)
    except BenchmarkArgumentError:
        return False
    return True


SUITE = PEERS + ("te_bf16",) + tuple(f"te_fp8_{recipe}" for recipe in RECIPES) + (
    "te_fp8_delayed_graphs", "te_fp8_delayed_graphs_cached", "te_fp8_delayed_fastacc_graphs_cached",
    "te_fp8_delayed_lora")
"""The default variants. ``te_fp8_delayed_fastacc_graphs_cached`` is te-llama's fastest opt-in: it changes the
backward's rounding, which its row's ``fp8`` field says."""
