"""Where one benchmark step spends its GPU time and memory (the profile behind benchmarks/NOTES.md).

For one variant and shape of ``te-llama bench``, after warm-up steps:

- kernel time per category (GEMM, attention, FP8 casts, norms, loss, optimizer, other) and the top kernels,
  from ``torch.profiler`` over ``--steps`` steps, with the GPU-idle share of the wall time;
- memory: parameters, what one forward leaves allocated for backward, what autograd saved by dtype (tensors
  that are parameters excluded), and the step's peak;
- for te-llama variants, whether each layer's Q, K and V weights are consecutive views of one buffer (TE then
  concatenates them for free; otherwise it copies them every forward).

    python benchmarks/profile_step.py --variant te_fp8_current --shape B --out profile_B_current.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from te_llama.benchmark import SHAPES, VARIANTS, environment, prepare_variant, training_step

CATEGORIES = (  # first match wins; matched against the lower-cased kernel name
    ("attention", ("fmha", "flash", "attn", "cudnn_generated", "sdpa")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "sm90_")),
    ("activation", ("gated_act", "swiglu", "silu", "gelu")),
    ("fp8 cast/transpose/amax", ("cast", "transpose", "quantize", "amax", "scale", "fp8")),
    ("norm", ("rmsnorm", "norm")),
    ("rope", ("rope", "rotary")),
    ("loss", ("softmax", "cross_entropy", "nll", "logsumexp", "gather", "scatter")),
    ("optimizer", ("adam", "multi_tensor")),
)


def category(name: str) -> str:
    lowered = name.lower()
    if "at::native" in lowered and "softmax" not in lowered:  # PyTorch's own kernels ("..._nocast" is no FP8 cast)
        return "optimizer" if "fusedoptimizer" in lowered else "other (elementwise, copies)"
    for label, keys in CATEGORIES:
        if any(key in lowered for key in keys):
            return label
    return "other (elementwise, copies)"


def qkv_layout(model) -> dict:
    """How many layers keep Q, K, V as consecutive slices of one storage."""
    layers = [m for m in model.modules() if hasattr(m, "layernorm_qkv")]
    shared = 0
    for layer in layers:
        qkv = layer.layernorm_qkv
        parts = [getattr(qkv, f"{n}_weight", None) for n in ("query", "key", "value")]
        if any(p is None for p in parts):
            continue
        same = len({p.untyped_storage().data_ptr() for p in parts}) == 1
        consecutive = all(a.data_ptr() + a.numel() * a.element_size() == b.data_ptr() for a, b in zip(parts, parts[1:]))
        shared += same and consecutive
    return {"layers": len(layers), "qkv_in_one_buffer": shared}


def saved_for_backward(model, ids, device_type: str = "cuda") -> dict:
    """Bytes autograd saves in one forward, by dtype, parameters excluded (each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, by_dtype = set(), collections.Counter()

    def pack(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.device.type == device_type:
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage
                by_dtype[f"unmeasured {type(tensor).__name__}"] += tensor.numel() * tensor.element_size()
                return tensor
            key = storage.data_ptr()
            if key not in params and key not in seen:
                seen.add(key)
                by_dtype[str(tensor.dtype).removeprefix("torch.")] += storage.nbytes()
        return tensor

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated()
    loss.backward()
    model.zero_grad(set_to_none=True)
    gib = 2**30
    hooked = sum(by_dtype.values())
    return {"forward_leaves_gib": (after_forward - before) / gib, "saved_by_dtype_gib": {k: v / gib for k, v in by_dtype.items()},
            "saved_total_gib": hooked / gib, "not_seen_by_hooks_gib": (after_forward - before - hooked) / gib}


def kernel_profile(model, ids, optimizer, steps: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            training_step(model, ids, optimizer)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / steps
    kernels = collections.Counter()
    for event in prof.key_averages():
        annotation = getattr(event, "is_user_annotation", False) or "#" in event.key  # e.g. Optimizer.step#AdamW.step
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0 and not annotation:
            kernels[event.key] += event.self_device_time_total / 1000 / steps  # us -> ms per step
    by_category = collections.Counter()
    for name, ms in kernels.items():
        by_category[category(name)] += ms
    busy = sum(kernels.values())
    return {"wall_ms_per_step_profiled": wall_ms, "kernel_ms_per_step": busy,
            "gpu_idle_share": max(0.0, 1 - busy / wall_ms),
            "by_category_ms": dict(by_category.most_common()),
            "top_kernels_ms": [(name[:160], ms) for name, ms in kernels.most_common(top)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--shape", default="B", choices=list(SHAPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--full-logits", action="store_true", help="te-llama: HF's LM head + loss path")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    model, optimizer, ids = prepare_variant(args.variant, SHAPES[args.shape], torch.device("cuda"))
    if args.full_logits:
        model.chunked_lm_head_loss = False
    for _ in range(args.warmup):
        training_step(model, ids, optimizer)
    report = {"variant": args.variant, "shape": args.shape, "full_logits": args.full_logits, **environment(),
              "parameters_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30}
    if args.variant.startswith("te_"):
        report["qkv_layout"] = qkv_layout(model)
    torch.cuda.reset_peak_memory_stats()
    report["memory"] = saved_for_backward(model, ids)
    report["memory"]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report["profile"] = kernel_profile(model, ids, optimizer, args.steps, args.top)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: report[k] for k in ("variant", "shape", "full_logits")} | {"memory": report["memory"],
          "qkv": report.get("qkv_layout"), "by_category_ms": report["profile"]["by_category_ms"],
          "wall_ms": report["profile"]["wall_ms_per_step_profiled"], "idle": report["profile"]["gpu_idle_share"]}, indent=1))
    for name, ms in report["profile"]["top_kernels_ms"][:12]:
        print(f"{ms:8.2f} ms  {name[:110]}")


if __name__ == "__main__":
    main()
