"""``AdamW``: ``torch.optim.AdamW`` whose CUDA step runs a Triton kernel for each large parameter.

The Triton kernel (:mod:`te_llama.kernels.adamw_triton`) moves the 14 bytes per parameter an AdamW step must move
faster than torch's fused AdamW for large parameters (``docs/performance.md``). Each Triton launch costs the host
some 30 us, so parameters under :data:`TRITON_MIN_NUMEL` elements (norm weights; all of a small model's matrices) go
through torch's own multi-tensor fused kernel in one launch per dtype instead. Both compute torch's fused update
(float32 math, moments stored in the parameter's dtype), and the state is torch's (``step``, ``exp_avg``,
``exp_avg_sq``), so checkpoints move between this optimizer and torch's in both directions.

A step that the kernel does not cover runs torch's own AdamW, the same update: parameters off CUDA, Triton not
installed, ``amsgrad``/``maximize``/``capturable``/``differentiable``, sparse or non-contiguous gradients,
gradients of another dtype than their parameter, a learning rate held in a CUDA tensor, or parameters sharded by
FSDP2 (DTensors, which torch's step updates shard by shard).
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.optim.optimizer import _get_scalar_dtype

from te_llama.backend import triton_installed

TRITON_MIN_NUMEL = 1 << 22
"""Parameters with at least this many elements (4M: Llama-3-8B's K/V projections and up) take the Triton
kernel; the rest take torch's multi-tensor fused kernel."""


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments, defaults, state and ``state_dict``) with a Triton CUDA step."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs):
        if kwargs.get("fused") or kwargs.get("capturable"):
            raise ValueError("te_llama.AdamW runs its own fused kernel; fused=True/capturable=True select torch's "
                             "(use torch.optim.AdamW for those)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    def uses_triton(self) -> bool:
        """Whether the next step runs te-llama's CUDA step (Triton for large parameters, torch's multi-tensor fused
        kernel for the small ones), else torch's AdamW step."""
        if not triton_installed() or not hasattr(torch, "_fused_adamw_"):
            return False
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                return False
            if isinstance(group["lr"], torch.Tensor) and group["lr"].device.type != "cpu":
                return False
            if not all(_kernel_fits(param, param.grad) for param in group["params"]):
                return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self.uses_triton():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from te_llama.kernels.adamw_triton import adamw_update

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # a group without gradients this step (frozen parameters): nothing to update
                continue
            states = [self._state(p) for p in params]
            torch._foreach_add_([state["step"] for state in states], 1)  # one call: a small model has hundreds
            small = collections.defaultdict(list)  # (dtype, device, step) -> parameters for torch's kernel
            for param, state in zip(params, states):
                step = int(state["step"].item())
                if param.numel() >= TRITON_MIN_NUMEL:
                    adamw_update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], step=step, **hyper)
                else:
                    small[(param.dtype, param.device, step)].append(param)
            for (_, device, step), tensors in small.items():
                steps = [torch.full((), float(step), dtype=torch.float32, device=device)] * len(tensors)
                torch._fused_adamw_(tensors, [p.grad for p in tensors], [self.state[p]["exp_avg"] for p in tensors],
                                    [self.state[p]["exp_avg_sq"] for p in tensors], [], steps, amsgrad=False,
                                    maximize=False, **hyper)
        return loss

    def _state(self, param: torch.Tensor) -> dict:
        """The parameter's state, created as torch's AdamW creates it."""
        state = self.state[param]
        if not state:  # step on the CPU: what torch's AdamW does when neither fused nor capturable
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if state["step"].device.type != "cpu":  # loaded from a fused or capturable torch AdamW
            state["step"] = state["step"].to("cpu", torch.float32)
        if not (state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous()):
            raise RuntimeError("te_llama.AdamW: the optimizer state of a parameter is not contiguous; was it loaded "
                               "from a state dict of another memory layout?")
        return state


def _kernel_fits(param: torch.Tensor, grad: torch.Tensor | None) -> bool:
    fits = (param.device.type == "cuda" and param.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and param.is_contiguous() and not _is_dtensor(param))
    return fits and (grad is None or not grad.is_sparse and grad.dtype == param.dtype and grad.is_contiguous())


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # DTensors exist only once torch.distributed.tensor is imported; not importing it keeps te_llama's import light.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def describe(optimizer) -> str | None:
    """A short name of the optimizer a run uses (unwrapping accelerate's), for summaries and benchmark rows."""
    if optimizer is None:
        return None
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if isinstance(optimizer, AdamW):
        return "te-llama AdamW (Triton)" if optimizer.uses_triton() else "te-llama AdamW (torch's step)"
    fused = isinstance(getattr(optimizer, "defaults", None), dict) and optimizer.defaults.get("fused")
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}" + (" (fused)" if fused else "")
