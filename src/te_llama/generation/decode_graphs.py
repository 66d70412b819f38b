"""CUDA graphs of ``generate()``'s decode step on HF's ``StaticCache`` (:meth:`TECausalLM.enable_decode_graphs`).

At batch 1 a decode step is host-bound: each of TE's modules and HF's cache run Python at every call, and the GPU
waits for the launches. A recorded step (:class:`te_llama.generation.decode_step.DecodeStep`) launches all decoder
layers' kernels at once. HF's decoder stack still runs its forward: the embedding, the position ids, the attention
mask (host-side work on data, kept out of the graph), then the layers, the final norm and the LM head. The first
layer's call replays the step and the others hand its output on (:mod:`te_llama.model.whole_stack_call`).

A step is recorded at the first decode step (one new token per row) of each (batch size, static cache length,
dtype, FP8 recipe) and replayed at every later one, in this ``generate()`` call and the next. In FP8 with current
scaling (``FP8Config(recipe="current", in_eval=True)``) a step records the FP8 GEMMs on the weights' FP8 cast that
``generate()`` keeps (:meth:`te_llama.model.decoder_stack.TEDecoderStack.generation_call`): the first decode step of
each call runs eagerly and casts them anew, in place, so the recorded step reads this call's weights; the tokens are
padded to FP8's alignment as eagerly. A decode step runs eagerly, as without graphs, where:

- the cache is not a ``StaticCache`` of full-attention layers on the GPU (a ``DynamicCache``, a sliding window,
  offloading), or the model is not on a CUDA device;
- gradients are enabled or the model is in training mode; FP8 with another recipe than current scaling (delayed
  scaling's amax history is updated in Python at every forward, which a replay would skip); ``torch.autocast`` is on;
- PEFT adapters are on the layers, the batch is packed, or the forward asks for per-layer outputs
  (``output_hidden_states``, ``output_attentions``);
- HF's attention mask or position ids have another shape than a recorded step takes.

Each reason is logged once (te-llama's logger, INFO). The prompt's forward (the prefill) always runs eagerly.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from te_llama import te_patches
from te_llama.generation.decode_step import DecodeStep
from te_llama.generation.static_cache import cache_length, graph_reason
from te_llama.model.adapters import has_adapters
from te_llama.model.rope import RotaryAngles
from te_llama.model.whole_stack_call import WholeStackCall

logger = logging.getLogger("te_llama")


@dataclass(frozen=True)
class FP8Step:
    """How a decode step's forward runs in FP8: its recipe, the token alignment its GEMMs need, and TE's
    ``is_first_microbatch`` that ``generate()`` chose for it (``False``: the kept FP8 cast of the weights is
    current)."""

    recipe_name: str
    token_alignment: int
    is_first_microbatch: bool | None


class DecodeGraphs:
    """A model's recorded decode steps, one per (batch size, static cache length, dtype, FP8 recipe), and when they
    run."""

    def __init__(self, layers, capture: bool = True):
        self.layers = layers
        self.capture = capture
        """``False``: steps keep their buffers but run their function eagerly instead of a graph (see
        :mod:`te_llama.generation.decode_step`), on any device."""
        self.steps: dict[tuple[int, int, torch.dtype, str | None], DecodeStep] = {}
        self.replays = 0
        """Decode steps served by a recorded step (replayed, or with ``capture=False`` run on its buffers)."""
        self._stack_call = WholeStackCall()
        self._reported: set[str] = set()

    def serves(self, stack, kwargs: dict) -> bool:
        """Whether the decoder layers of this forward on HF's cache (``kwargs``: the decoder stack's) may run as a
        recorded step; the layers check the rest (:meth:`layer_forward`)."""
        return self._allows(self._forward_reason(stack, kwargs))

    def layer_forward(self, layer_idx: int, hidden_states: torch.Tensor, attention_mask, rotary, cache,
                      fp8: FP8Step | None = None) -> torch.Tensor | None:
        """The output of decoder layer ``layer_idx`` from a recorded step, or ``None``: the layer runs eagerly.
        ``fp8``: this forward runs in FP8 (current scaling) and how."""
        if layer_idx > 0:
            return hidden_states if self._stack_call.hands_on(hidden_states) else None
        self._stack_call.start()
        if hidden_states.shape[1] != 1:
            return None  # the prefill
        if fp8 is not None and fp8.is_first_microbatch is not False:
            return None  # this forward casts the FP8 weights (the call's first decode step): eagerly, in place
        if not self._allows(self._inputs_reason(hidden_states, attention_mask, rotary, cache)):
            return None
        step = self._step_for(hidden_states, attention_mask, rotary, cache, fp8)
        self.replays += 1
        return self._stack_call.computed(step.run(hidden_states, attention_mask, rotary, cache))

    def _forward_reason(self, stack, kwargs: dict) -> str | None:
        if stack.training or torch.is_grad_enabled():
            return "a forward with gradients or in training mode"
        settings = stack.te_settings
        if settings.fp8_active(stack.training) and settings.fp8_recipe_name != "current":
            return (f"FP8 with the {settings.fp8_recipe_name} recipe, whose scaling state TE updates in Python at "
                    "every forward (FP8 decode steps are recorded with current scaling)")
        if settings.fp8_active(stack.training) and not te_patches.tested(te_patches.te_version()):
            return (f"FP8 decode steps read the weight casts TE keeps, checked with Transformer Engine "
                    f"{te_patches.TESTED_TE}, not {te_patches.te_version()}")
        if torch.is_autocast_enabled("cuda"):
            return "torch.autocast is on"
        if kwargs.get("packed_sequences") is not None or kwargs.get("cu_seq_lens_q") is not None:
            return "a packed batch"
        if any(kwargs.get(key, getattr(stack.config, key, False)) for key in ("output_hidden_states",
                                                                              "output_attentions")):
            return "the forward asks for per-layer outputs (output_hidden_states or output_attentions)"
        if has_adapters(stack.layers):
            return "PEFT adapters are on the decoder layers"
        cache = next((kwargs[key] for key in ("cache", "past_key_values") if kwargs.get(key) is not None), None)
        if cache is None:
            return "the forward makes its own DynamicCache; decode graphs need a StaticCache"
        return graph_reason(cache)

    def _inputs_reason(self, hidden_states: torch.Tensor, attention_mask, rotary, cache) -> str | None:
        if self.capture and hidden_states.device.type != "cuda":
            return f"the model is on {hidden_states.device.type}; CUDA graphs need a CUDA device"
        if not isinstance(rotary, RotaryAngles):
            return ""  # the eager layer says what is wrong
        batch = hidden_states.shape[0]
        mask_shape = (batch, 1, 1, cache_length(cache))
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != mask_shape \
                or attention_mask.dtype != torch.bool:
            found = (tuple(attention_mask.shape), attention_mask.dtype) if isinstance(attention_mask, torch.Tensor) \
                else attention_mask
            return f"HF's attention mask is {found}; a recorded step takes a boolean one of shape {mask_shape}"
        if tuple(rotary.position_ids.shape) not in ((batch, 1), (1, 1)):
            return f"position ids of shape {tuple(rotary.position_ids.shape)} for a batch of {batch}"
        return None

    def _step_for(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, rotary, cache,
                  fp8: FP8Step | None) -> DecodeStep:
        key = (hidden_states.shape[0], cache_length(cache), hidden_states.dtype, fp8 and fp8.recipe_name)
        step = self.steps.get(key)
        if step is not None and not step.memory.holds(cache) and step.weights_moved():
            logger.info("the decoder's parameters moved since the decode step was recorded; recording it again")
            step = None
        if step is not None and fp8 is not None and step.fp8_casts_replaced():
            logger.info("TE replaced the FP8 weight casts the decode step was recorded on; recording it again")
            step = None
        if step is None:
            step = DecodeStep(self.layers, cache, hidden_states, attention_mask, rotary, self.capture,
                              fp8.token_alignment if fp8 else 1)
            self.steps[key] = step
            logger.info("recorded the decode step %sfor batches of %d rows on a static cache of %d tokens (%s%s)",
                        "" if self.capture else "(without a CUDA graph) ", key[0], key[1],
                        str(key[2]).removeprefix("torch."), f", FP8 {key[3]}" if key[3] else "")
        return step

    def _allows(self, reason: str | None) -> bool:
        """``True`` where ``reason`` is ``None``; otherwise ``False``, and the reason logged once (``""``: expected,
        not logged)."""
        if reason and reason not in self._reported:
            self._reported.add(reason)
            logger.info("decode steps run eagerly, not as a CUDA graph: %s (said once)", reason)
        return reason is None

    def release(self) -> None:
        """Drop the recorded steps and return their graphs' memory."""
        self.steps.clear()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def __deepcopy__(self, memo):  # a copied model records steps of its own
        return DecodeGraphs(copy.deepcopy(self.layers, memo), self.capture)
