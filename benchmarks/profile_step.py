"""Where one benchmark step spends its GPU time and memory (the profiles behind docs/performance.md).

For one variant and shape of ``te-llama bench``, after warm-up steps:

- kernel time per category (GEMM, attention, FP8 casts, norms, loss, optimizer, other) and the top kernels,
  from ``torch.profiler`` over ``--steps`` steps, with the GPU-idle share of the wall time;
- memory: parameters, what one forward leaves allocated for backward, what autograd saved by dtype (tensors
  that are parameters excluded), and the step's peak;
- the host synchronisations one step makes (``torch.cuda.set_sync_debug_mode``), by source line, and the
  step time without the profiler, against which the kernel time gives the GPU-idle share;
- with ``--gaps``: where the GPU waits for the host. From a trace of one step, each gap between kernels is
  charged to what the host was doing when it launched the kernel after the gap (the innermost profiler range
  open at the launch: a module's forward, marked here with hooks, or an autograd backward node);
- with ``--timeline``: several steps timed as ``te-llama bench`` times them (CUDA events, a synchronisation
  after each), traced: per step the event time, the kernels' span, the GPU idle before the first kernel and
  after the last one, per phase (forward, backward, optimizer) the host's time against the GPU's busy time,
  the slow CUDA runtime calls (allocation, synchronisation), when each CUDA graph was launched and for how long,
  and with ``--with-stack`` the host's Python functions while the GPU waited for the first kernel (with CUDA
  graphs: for the forward graph's launch);
- for te-llama variants, whether each layer's Q, K and V weights are consecutive views of one buffer (TE then
  concatenates them for free; otherwise it copies them every forward).

    python benchmarks/profile_step.py --variant te_fp8_current --shape B --out profile_B_current.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator

import torch

from te_llama.bench.suite import (SHAPES, environment, parse_variant, prepare_variant, time_steps, timed_ms,
                                training_step)

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


def host_syncs(model, ids, optimizer) -> dict[str, int]:
    """Where one training step makes the host wait for the GPU: the innermost calling frames -> count."""
    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            frames = [f for f in traceback.extract_stack()[:-1] if os.path.basename(f.filename) != "warnings.py"][-4:]
            found.append(" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames)))

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            training_step(model, ids, optimizer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(collections.Counter(found).most_common())


GPU_BUSY = ("kernel", "gpu_memcpy", "gpu_memset")


def _mark_modules(model) -> list:
    """Profiler ranges around the forward of each decoder layer and its TE sub-modules, the embedding and the
    final norm (hooks; removed by the caller)."""
    from torch.autograd.profiler import record_function

    handles = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if not (short in ("embed_tokens", "norm", "layernorm_qkv", "core_attention", "proj", "layernorm_mlp")
                or name.count(".") == 2 and ".layers." in name):
            continue
        label = f"fwd {type(module).__name__}" + (f" {short}" if short not in type(module).__name__ else "")

        def enter(module, args, label=label):
            module._profile_range = record_function(label)
            module._profile_range.__enter__()

        def leave(module, args, output):
            module._profile_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def idle_gaps(model, ids, optimizer, top: int = 15, threshold_us: float = 20.0) -> dict:
    """GPU idle time within one profiled step, charged to the host-side range that launched the next kernel."""
    from torch.profiler import ProfilerActivity, profile

    handles = _mark_modules(model)
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            training_step(model, ids, optimizer)
            torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
    return charge_gaps(trace_events(prof), top, threshold_us)


def trace_events(prof) -> list[dict]:
    """The events of a finished ``torch.profiler`` run, as its Chrome trace lists them."""
    with tempfile.TemporaryDirectory() as scratch:
        trace_path = os.path.join(scratch, "trace.json")
        prof.export_chrome_trace(trace_path)
        with open(trace_path) as handle:
            return json.load(handle)["traceEvents"]


def gaps_between(kernels: list[dict]) -> Iterator[tuple[float, dict]]:
    """``(idle us, kernel after the gap)`` for each stretch of idle GPU between ``kernels`` (sorted by start;
    overlapping kernels count as one busy stretch)."""
    end = None
    for kernel in kernels:
        if end is not None and kernel["ts"] > end:
            yield kernel["ts"] - end, kernel
        end = kernel["ts"] + kernel["dur"] if end is None else max(end, kernel["ts"] + kernel["dur"])


def charge_gaps(trace_events: list[dict], top: int = 15, threshold_us: float = 20.0) -> dict:
    """Gaps between GPU kernels in a Chrome trace, each charged to the innermost host range (module mark,
    autograd node, optimizer step, else any op) open when the kernel after the gap was launched."""
    events = [e for e in trace_events if e.get("ph") == "X"]
    busy = sorted((e for e in events if e.get("cat") in GPU_BUSY), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = collections.defaultdict(list)  # host thread -> ranges (ops, module marks, backward nodes)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            ranges[e["tid"]].append(e)

    def innermost(launch) -> str:
        inside = [r for r in ranges[launch["tid"]] if r["ts"] <= launch["ts"] <= r["ts"] + r["dur"]]
        named = [r for r in inside if r["name"].startswith(("fwd ", "autograd::engine", "Optimizer"))]
        chosen = max(named or inside, key=lambda r: r["ts"], default=None)
        return chosen["name"][:120] if chosen else "(no range)"

    gaps = [(gap_us, kernel) for gap_us, kernel in gaps_between(busy) if gap_us > threshold_us]
    by_range = collections.Counter()
    for gap_us, kernel in gaps:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        by_range[innermost(launch) if launch else "(launch not found)"] += gap_us / 1000
    largest = sorted(gaps, key=lambda g: -g[0])[:top]
    span_us = max(e["ts"] + e["dur"] for e in busy) - busy[0]["ts"] if busy else 0.0
    return {"step_span_ms": span_us / 1000, "gaps_over_us": threshold_us,
            "gaps": len(gaps), "gaps_ms": sum(g for g, _ in gaps) / 1000,
            "gap_ms_by_launching_range": dict(by_range.most_common(top)),
            "largest_gaps": [(round(g / 1000, 3), k["name"][:80]) for g, k in largest]}


def timeline(model, ids, optimizer, steps: int = 3, with_stack: bool = False) -> list[dict]:
    """``steps`` benchmark-timed steps under the profiler: where the event-timed step is longer than its kernels."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    def step():
        with record_function("timed_step"):
            return training_step(model, ids, optimizer, phase=lambda name: record_function(f"phase {name}"))

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=with_stack) as prof:
        measured = [timed_ms(step)[0] for _ in range(steps)]
    return step_timelines([e for e in trace_events(prof) if e.get("ph") == "X"], measured)


def step_timelines(events: list[dict], measured_ms: list[float], slow_us: float = 200.0) -> list[dict]:
    """Per ``timed_step`` range of a Chrome trace: lead (host range start to first GPU work), the kernels' span
    and busy time, per phase (``phase ...`` ranges) the host's time and the GPU's busy time and span, slow
    runtime calls, and (traced with stacks) the Python functions that ran before the first kernel."""
    steps = sorted((e for e in events if e["name"] == "timed_step" and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])
    busy = sorted((e for e in events if e.get("cat") in GPU_BUSY), key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launch_ts = {e["args"]["correlation"]: e["ts"] for e in runtime if "correlation" in e.get("args", {})}
    phases = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("phase ")]
    python = [e for e in events if e.get("cat") == "python_function"]
    rows = []
    for index, (step, ms) in enumerate(zip(steps, measured_ms)):
        start, stop = step["ts"], step["ts"] + step["dur"]
        following = steps[index + 1]["ts"] if index + 1 < len(steps) else float("inf")
        gpu = [e for e in busy if start <= e["ts"] < following]
        if not gpu:
            continue
        first, last_end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
        per_phase = {}
        for phase in (e for e in phases if start <= e["ts"] <= stop):
            launched = [e for e in gpu if phase["ts"] <= launch_ts.get(e.get("args", {}).get("correlation"), -1)
                        <= phase["ts"] + phase["dur"]]
            if launched:
                per_phase[phase["name"].removeprefix("phase ")] = {
                    "host_ms": phase["dur"] / 1000, "gpu_busy_ms": sum(e["dur"] for e in launched) / 1000,
                    "gpu_span_ms": (max(e["ts"] + e["dur"] for e in launched) - launched[0]["ts"]) / 1000,
                    "gpu_start_ms": (launched[0]["ts"] - start) / 1000, "kernels": len(launched),
                    **gap_sizes(launched)}
        graph_launches = sorted((e for e in runtime if start <= e["ts"] <= stop and e["name"] == "cudaGraphLaunch"),
                                key=lambda e: e["ts"])
        # Before the first kernel, or, with CUDA graphs, before the forward graph is launched: the host time the
        # GPU waits for at the start of a step.
        until = graph_launches[0]["ts"] if graph_launches else first
        lead_python = collections.Counter()
        for e in python:
            if start <= e["ts"] and e["ts"] + e["dur"] <= until and e["dur"] >= slow_us:
                lead_python[e["name"][:100]] += e["dur"] / 1000
        rows.append({
            "event_ms": ms, "kernel_span_ms": (last_end - first) / 1000,
            "gpu_busy_ms": sum(e["dur"] for e in gpu) / 1000,
            "lead_ms": (first - start) / 1000, "host_after_last_kernel_ms": max(0.0, stop - last_end) / 1000,
            "phases": per_phase,
            "slow_runtime_calls": [(e["name"], round(e["dur"] / 1000, 3), round((e["ts"] - start) / 1000, 3))
                                   for e in runtime if start <= e["ts"] <= stop and e["dur"] >= slow_us][:20],
            "graph_launches_ms": [(round((e["ts"] - start) / 1000, 3), round(e["dur"] / 1000, 3))
                                  for e in graph_launches],
            "python_in_lead_ms": dict(lead_python.most_common(25)),
        })
    return rows


def gap_sizes(kernels: list[dict], bounds_us=(5.0, 20.0, 100.0)) -> dict:
    """Idle GPU time between consecutive ``kernels`` (sorted by start), summed by gap size, in ms: many small gaps
    (launch latency between dependent kernels) or a few large ones (the GPU waiting for the host)."""
    sums, counts = collections.Counter(), collections.Counter()
    for gap, _ in gaps_between(kernels):
        label = next((f"<{b:g}us" for b in bounds_us if gap < b), f">={bounds_us[-1]:g}us")
        sums[label] += gap / 1000
        counts[label] += 1
    return {"gap_ms_by_size": {k: round(v, 3) for k, v in sorted(sums.items())}, "gaps_by_size": dict(counts)}


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
    parser.add_argument("--variant", required=True, type=parse_variant)
    parser.add_argument("--shape", default="B", choices=list(SHAPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--full-logits", action="store_true", help="te-llama: HF's LM head + loss path")
    parser.add_argument("--gaps", action="store_true", help="also charge GPU idle gaps to host-side ranges")
    parser.add_argument("--timeline", action="store_true",
                        help="only trace benchmark-timed steps: GPU idle before/after the kernels, slow runtime calls")
    parser.add_argument("--with-stack", action="store_true", help="--timeline: also record Python functions "
                        "(slows the host a lot: only for what runs before the first kernel)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    model, optimizer, ids = prepare_variant(args.variant, SHAPES[args.shape], torch.device("cuda"))
    if args.full_logits:
        model.chunked_lm_head_loss = False
    for _ in range(args.warmup):
        training_step(model, ids, optimizer)
    report = {"variant": args.variant, "shape": args.shape, "full_logits": args.full_logits, **environment(),
              "parameters_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30}
    if args.timeline:
        report["timeline"] = timeline(model, ids, optimizer, with_stack=args.with_stack)
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
        print(json.dumps(report["timeline"], indent=1))
        return
    if args.variant.startswith("te_"):
        report["qkv_layout"] = qkv_layout(model)
    torch.cuda.reset_peak_memory_stats()
    report["memory"] = saved_for_backward(model, ids)
    report["memory"]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report["host_syncs"] = host_syncs(model, ids, optimizer)
    report["ms_per_step_unprofiled"] = statistics.median(time_steps(model, ids, optimizer, 5)[0])
    report["profile"] = kernel_profile(model, ids, optimizer, args.steps, args.top)
    report["gpu_idle_share_unprofiled"] = max(0.0, 1 - report["profile"]["kernel_ms_per_step"]
                                              / report["ms_per_step_unprofiled"])
    if args.gaps:
        report["idle_gaps"] = idle_gaps(model, ids, optimizer)
        print(json.dumps(report["idle_gaps"], indent=1))
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: report[k] for k in ("variant", "shape", "full_logits")} | {"memory": report["memory"],
          "qkv": report.get("qkv_layout"), "by_category_ms": report["profile"]["by_category_ms"],
          "wall_ms": report["profile"]["wall_ms_per_step_profiled"], "idle": report["profile"]["gpu_idle_share"],
          "ms_unprofiled": report["ms_per_step_unprofiled"], "idle_unprofiled": report["gpu_idle_share_unprofiled"],
          "host_syncs": report["host_syncs"]}, indent=1))
    for name, ms in report["profile"]["top_kernels_ms"][:12]:
        print(f"{ms:8.2f} ms  {name[:110]}")


if __name__ == "__main__":
    main()
