"""HF-named projections on te-llama's decoder layers, so that PEFT's LoRA works as on a Hugging Face Llama.

TE fuses what HF keeps apart: q/k/v live in one ``LayerNormLinear`` behind the input norm, gate and up in one
``fc1_weight`` of a ``LayerNormMLP`` that also applies SwiGLU and ``down``. PEFT, though, finds its targets by
HF's module names (``self_attn.q_proj``, ..., ``mlp.down_proj``, or ``"all-linear"``) and types (``nn.Linear``).
So every te-llama layer carries stand-ins with those names, :class:`ProjectionSite`: an ``nn.Linear`` whose
``weight`` and ``bias`` are views of TE's parameters, so PEFT sizes its adapters from them and ``merge()`` /
``merge_and_unload()`` write into TE's weights, and whose forward computes nothing (a broadcast zero). The layer
adds the contribution of PEFT's LoRA module around a site (PEFT's weights, dropout, scaling, rsLoRA, several or
disabled adapters) where HF's projection output is, the sites of one fused projection in two GEMMs
(:mod:`te_llama.model.lora`):

- ``q_proj``, ``k_proj``, ``v_proj`` see the normed hidden states (what HF's see) and add to the columns of
  ``layernorm_qkv``'s output ([q | k | v], TE's order with unfused q/k/v parameters), before anything else sees it:
  Qwen3's q/k norm then normalises ``q_proj(x) + lora(x)``, as HF's ``q_norm(q_proj(x))`` does with PEFT;
- ``o_proj`` sees the attention output, ``proj``'s input, and adds to ``proj``'s output;
- ``gate_proj``, ``up_proj`` and ``down_proj`` need the MLP's intermediate values, which ``LayerNormMLP`` never
  exposes, so a layer with MLP adapters computes its MLP unfused: norm -> fc1 (+ gate/up) -> SwiGLU -> fc2
  (+ down), with separate Linear modules sharing ``LayerNormMLP``'s parameters (TE's, in FP8 under autocast).

A layer without active adapters runs TE's fused layer unchanged. The frozen base weights get no weight
gradients (PEFT sets ``requires_grad=False``; TE then skips them). An adapter saved from te-llama has HF's key
names, so plain transformers + PEFT loads it, and the other way round.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from te_llama.model.lora import add_lora
from te_llama.training.fp8_weights import FP8WeightsError, is_quantized

ATTENTION_SITES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_SITES = ("gate_proj", "up_proj", "down_proj")


class AdapterError(TypeError):
    """A PEFT method or option that te-llama's layers cannot run."""


class ProjectionSite(nn.Linear):
    """HF's name and shape for one of TE's projections; PEFT wraps it, TE's layer computes the projection.

    ``weight``/``bias`` are views of the owner's TE parameters (rows ``rows`` of a fused one). They are not
    parameters of this module, so state dicts, optimizers and checkpoints see TE's parameters once.
    """

    _is_hf_initialized = True  # HF's init must not touch TE's weights through the views

    def __init__(self, owner: nn.Module, weight: str, bias: str | None, in_features: int, out_features: int,
                 rows: slice | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight of its own
        self.in_features, self.out_features = in_features, out_features
        # A plain attribute, not a submodule: the owner already sits in the layer's module tree.
        object.__setattr__(self, "_owner", owner)
        self._weight_name, self._bias_name, self._rows = weight, bias, rows

    def _view(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        tensor = getattr(self._owner, name)
        if is_quantized(tensor):  # PEFT reads it to add adapters and writes into it to merge them
            raise FP8WeightsError(
                f"{name} is kept in FP8 (quantize_frozen_weights()): PEFT can neither add adapters on it nor merge "
                "them into it; call model.dequantize_weights() first (or merge into the BF16 checkpoint)")
        return tensor if self._rows is None else tensor[self._rows]

    @property
    def weight(self) -> torch.Tensor:
        return self._view(self._weight_name)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._view(self._bias_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projection itself runs inside TE's layer; what a PEFT wrapper adds to this zero is its adapters' share.
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rows = "" if self._rows is None else f"[{self._rows.start}:{self._rows.stop}]"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"computed_by={self._weight_name}{rows}")


class AttentionProjections(nn.Module):
    """``self_attn`` of an HF Llama layer: its q/k/v/o projection sites."""

    def __init__(self, **sites: ProjectionSite):
        super().__init__()
        for name in ATTENTION_SITES:
            self.add_module(name, sites[name])


class MLPProjections(nn.Module):
    """``mlp`` of an HF Llama layer: its gate/up/down projection sites."""

    def __init__(self, has_bias: bool, **sites: ProjectionSite):
        super().__init__()
        self.has_bias = has_bias
        for name in MLP_SITES:
            self.add_module(name, sites[name])


def add_projection_sites(layer: nn.Module, config, biases) -> None:
    """Give ``layer`` (a ``TELlamaDecoderLayer``) HF's ``self_attn.*_proj`` and ``mlp.*_proj`` modules; ``biases``
    (:class:`te_llama.model.families.Biases`): which of them have a bias in HF's model."""
    attention, mlp = layer.self_attention, layer.layernorm_mlp
    qkv = attention.layernorm_qkv
    hidden, ffn = config.hidden_size, config.intermediate_size
    heads_dim = attention.proj.weight.shape[1]
    kv_dim = qkv.key_weight.shape[0]

    def bias(name: str, present: bool) -> str | None:
        return name if present else None

    layer.self_attn = AttentionProjections(
        q_proj=ProjectionSite(qkv, "query_weight", bias("query_bias", biases.qkv), hidden, heads_dim),
        k_proj=ProjectionSite(qkv, "key_weight", bias("key_bias", biases.qkv), hidden, kv_dim),
        v_proj=ProjectionSite(qkv, "value_weight", bias("value_bias", biases.qkv), hidden, kv_dim),
        o_proj=ProjectionSite(attention.proj, "weight", bias("bias", biases.proj), heads_dim, hidden),
    )
    layer.mlp = MLPProjections(
        biases.mlp,
        gate_proj=ProjectionSite(mlp, "fc1_weight", bias("fc1_bias", biases.mlp), hidden, ffn, slice(0, ffn)),
        up_proj=ProjectionSite(mlp, "fc1_weight", bias("fc1_bias", biases.mlp), hidden, ffn, slice(ffn, 2 * ffn)),
        down_proj=ProjectionSite(mlp, "fc2_weight", bias("fc2_bias", biases.mlp), ffn, hidden),
    )


def _check_lora_module(name: str, module: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer  # only reached once PEFT has wrapped a site

    if not isinstance(module, LoraLayer):
        raise AdapterError(
            f"{name} is a {type(module).__module__}.{type(module).__qualname__}: te-llama runs PEFT's LoRA "
            "(LoraConfig) on its layers; other PEFT methods change the projection's output in ways a site that "
            "computes nothing cannot carry")
    if getattr(module, "lora_variant", None):
        variants = ", ".join(sorted({type(v).__name__ for v in module.lora_variant.values()}))
        raise AdapterError(f"{name} uses a LoRA variant ({variants}; e.g. use_dora=True), which needs the base "
                           "projection's output inside the fused layer; te-llama runs plain LoRA")


def _contributes(module: nn.Module) -> bool:
    # PEFT's forward: merged adapters are already in the weights; disabled ones add nothing, but a merged and
    # disabled module unmerges in its forward, so it must be called.
    if module.merged != module.disable_adapters:
        return False
    return module.merged or any(name in module.lora_A for name in module.active_adapters)


def active_adapters(layer: nn.Module) -> dict[str, nn.Module]:
    """The PEFT modules wrapping ``layer``'s sites that contribute to this forward, by HF name."""
    found = {}
    for container in (layer.self_attn, layer.mlp):
        for name, module in container._modules.items():
            if type(module) is ProjectionSite:
                continue
            _check_lora_module(name, module)
            if _contributes(module):
                found[name] = module
    return found


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The adapters' input: what HF's projections see behind the norm. torch's kernel keeps no float32 copy of
    # x for the backward, which an explicit upcast would (two bytes more per element and layer).
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@contextmanager
def attention_adapters(attention: nn.Module, adapters: dict[str, nn.Module]):
    """While open, ``attention``'s q/k/v and output projections add the adapters' contributions."""
    qkv = attention.layernorm_qkv
    widths = qkv_widths(qkv)

    def add_qkv(module, args, output):
        normed = _rms_norm(args[0], module.layer_norm_weight, module.eps)
        return add_lora(output, normed, [(adapters.get(name), width)
                                         for name, width in zip(("q_proj", "k_proj", "v_proj"), widths)])

    def add_o(module, args, output):
        if isinstance(output, tuple):  # TE's proj returns (output, bias) and the layer adds the bias
            return (add_lora(output[0], args[0], [(adapters["o_proj"], output[0].shape[-1])]), *output[1:])
        return add_lora(output, args[0], [(adapters["o_proj"], output.shape[-1])])

    with ExitStack() as stack:
        if any(name in adapters for name in ("q_proj", "k_proj", "v_proj")):
            stack.callback(qkv.register_forward_hook(add_qkv).remove)
        if "o_proj" in adapters:
            stack.callback(attention.proj.register_forward_hook(add_o).remove)
        yield


def qkv_widths(qkv: nn.Module) -> tuple[int, int, int]:
    """Widths of the q, k and v blocks in ``layernorm_qkv``'s output ([q | k | v], TE's order)."""
    return qkv.query_weight.shape[0], qkv.key_weight.shape[0], qkv.value_weight.shape[0]


def qkv_heads(layer: nn.Module, x: torch.Tensor, is_first_microbatch: bool | None = None):
    """q, k, v ``[..., heads, head_dim]`` of ``x`` ``[..., hidden]`` from the layer's ``layernorm_qkv`` (with any
    adapters :func:`attention_adapters` added), the family's q/k norm applied: the first step of the layer run module
    by module (:mod:`te_llama.model.kv_cache`, :mod:`te_llama.model.packed`)."""
    attention = layer.self_attention
    qkv = attention.layernorm_qkv
    q, k, v = qkv(x, is_first_microbatch=is_first_microbatch).split(qkv_widths(qkv), dim=-1)
    q, k, v = (t.reshape(*x.shape[:-1], -1, layer.head_dim) for t in (q, k, v))
    if getattr(attention, "q_norm", None) is not None:  # Qwen3: te-llama sets qk_norm_before_rope=True
        q, k = attention.q_norm(q), attention.k_norm(k)
    return q, k, v


def mlp_output(layer: nn.Module, x: torch.Tensor, adapters: dict[str, nn.Module],
               is_first_microbatch: bool | None = None) -> torch.Tensor:
    """The layer's MLP on ``x``: TE's fused ``LayerNormMLP``, or unfused where adapters sit on its projections."""
    if any(name in adapters for name in MLP_SITES):
        return unfused_mlp(layer, x, adapters, is_first_microbatch)
    return plus_bias(layer.layernorm_mlp(x, is_first_microbatch=is_first_microbatch))


def plus_bias(outputs) -> torch.Tensor:
    output, bias = outputs if isinstance(outputs, tuple) else (outputs, None)
    return output if bias is None or bias.numel() == 0 else output + bias


def forward_with_adapters(layer: nn.Module, adapters: dict[str, nn.Module], hidden_states: torch.Tensor,
                          rotary_pos_emb: torch.Tensor, mask: torch.Tensor | None, mask_type: str,
                          is_first_microbatch: bool | None) -> torch.Tensor:
    """The decoder layer with the LoRA contributions of ``adapters`` (see the module docstring)."""
    with attention_adapters(layer.self_attention, adapters):
        if not any(name in adapters for name in MLP_SITES):
            return layer.te_forward(hidden_states, rotary_pos_emb, mask, mask_type, is_first_microbatch,
                                    weights_cached=False)
        hidden_states = layer.drop_cached_transposes(hidden_states, weights_cached=False)  # FP8 weights' transposes
        # TE's TransformerLayer hands its window_size to the attention at each call; so must a direct call.
        attention = layer.self_attention(hidden_states, attention_mask=mask, attn_mask_type=mask_type,
                                         window_size=layer.window_size, rotary_pos_emb=rotary_pos_emb,
                                         is_first_microbatch=is_first_microbatch)
    # TE's TransformerLayer with hidden_dropout=0 and pre-norm: x + attention(x), then + mlp(...).
    hidden_states = hidden_states + plus_bias(attention)
    return hidden_states + unfused_mlp(layer, hidden_states, adapters, is_first_microbatch)


def unfused_mlp(layer: nn.Module, hidden_states: torch.Tensor, adapters: dict[str, nn.Module],
                is_first_microbatch: bool | None) -> torch.Tensor:
    """``LayerNormMLP`` step by step, with the gate/up/down adapters added where HF's projections are."""
    mlp = layer.layernorm_mlp
    fc1, fc2 = mlp_linears(layer)
    normed = _rms_norm(hidden_states, mlp.layer_norm_weight, mlp.eps)
    gate_up = fc1(normed, is_first_microbatch)
    ffn = gate_up.shape[-1] // 2
    gate_up = add_lora(gate_up, normed, [(adapters.get("gate_proj"), ffn), (adapters.get("up_proj"), ffn)])
    activation = swiglu(layer, gate_up)
    output = fc2(activation, is_first_microbatch)
    if "down_proj" in adapters:
        output = add_lora(output, activation, [(adapters["down_proj"], output.shape[-1])])
    return output


Linear = Callable[[torch.Tensor, "bool | None"], torch.Tensor]


def mlp_linears(layer: nn.Module) -> tuple[Linear, Linear]:
    """fc1 and fc2 of ``layer``'s ``LayerNormMLP`` as separate linear maps over its own parameters."""
    mlp = layer.layernorm_mlp
    if layer.backend == "te":
        return _te_steps(layer).bound(mlp, layer.training)
    fc1_bias, fc2_bias = (mlp.fc1_bias, mlp.fc2_bias) if layer.mlp.has_bias else (None, None)
    return (lambda x, _: F.linear(x, mlp.fc1_weight, fc1_bias)), (lambda x, _: F.linear(x, mlp.fc2_weight, fc2_bias))


def swiglu(layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half of ``gate_up`` times its second half (TE's convention, as in ``LayerNormMLP``). On TE
    it is TE's kernel (``te.ops.SwiGLU``): one pass each way, and only its input kept for the backward, where torch's
    ``silu`` and product take two passes forward, three back, and keep ``silu(gate)`` as well."""
    if layer.backend == "te":
        return _te_steps(layer).swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _TEMLPSteps:
    """Two ``te.Linear`` modules, built without weights of their own, that run on ``LayerNormMLP``'s parameters, and
    TE's SwiGLU between them.

    The linears carry their own FP8 scaling state (amax history) under delayed scaling. They are kept out of the module
    tree (a plain attribute of the layer), so state dicts, ``.to()`` and optimizers see each parameter once; the
    parameters are bound again at every call, so a moved or replaced parameter is the one used."""

    def __init__(self, mlp: nn.Module, bias: bool):
        import transformer_engine.pytorch as te

        ffn, hidden = mlp.fc2_weight.shape[1], mlp.fc2_weight.shape[0]
        dtype = mlp.fc1_weight.dtype
        self.bias = bias
        self.fc1 = te.Linear(hidden, 2 * ffn, bias=bias, params_dtype=dtype, device="meta")
        self.fc2 = te.Linear(ffn, hidden, bias=bias, params_dtype=dtype, device="meta")
        self.swiglu = te.ops.SwiGLU()

    def bound(self, mlp: nn.Module, training: bool) -> tuple[Linear, Linear]:
        for linear, prefix in ((self.fc1, "fc1"), (self.fc2, "fc2")):
            linear._parameters["weight"] = getattr(mlp, f"{prefix}_weight")
            if self.bias:
                linear._parameters["bias"] = getattr(mlp, f"{prefix}_bias")
            linear.train(training)
        return ((lambda x, first: self.fc1(x, is_first_microbatch=first)),
                (lambda x, first: self.fc2(x, is_first_microbatch=first)))


def _te_steps(layer: nn.Module) -> _TEMLPSteps:
    steps = layer.__dict__.get("_unfused_mlp_steps")
    if steps is None:
        steps = _TEMLPSteps(layer.layernorm_mlp, bias=layer.mlp.has_bias)
        object.__setattr__(layer, "_unfused_mlp_steps", steps)
    return steps


def has_adapters(layers) -> bool:
    """Whether PEFT has wrapped any site of ``layers``."""
    return any(type(module) is not ProjectionSite
               for layer in layers for container in (layer.self_attn, layer.mlp)
               for module in container._modules.values())
