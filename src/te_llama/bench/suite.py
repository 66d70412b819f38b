"""``te-llama bench``: te-llama against what users would pick instead, each variant in its own process.

Variants: HF BF16 (SDPA), HF BF16 + ``torch.compile``, Liger-Kernel, torchao float8 training (tensorwise,
compiled), te-llama BF16 and te-llama FP8 per recipe. The compiled variants compile each decoder layer and the
loss function (regional compilation, as torchtitan does): one compiled layer serves all layers, so compiling
takes seconds instead of minutes. A variant's process runs the requested shapes one after the other, a fresh
model each, with GPU memory released in between. Shapes (random weights and tokens, bf16 parameters):

- ``A``: Llama-3-8B layer shapes, 8 layers, batch 2 x 4096, forward with labels + backward + fused AdamW step
  (torch's fused AdamW for HF and the peers, te-llama's :class:`te_llama.training.adamw.AdamW` for te-llama);
- ``B``: full Llama-3-8B (32 layers), batch 1 x 4096, forward + backward;
- ``C``: the TE tutorial's setting, 16 layers, batch 8 x 256, with the optimizer step;
- ``mistral``, ``qwen2``, ``qwen3``: shape A for the other families, 8 layers of Mistral-7B-v0.3, Qwen2.5-7B and
  Qwen3-8B (their hidden, MLP, head and vocabulary sizes and RoPE base), batch 2 x 4096 with the optimizer step;
  the HF row of such a shape is that family's HF class, te-llama's rows its te-llama class;
- ``tiny`` (Llama) and ``tiny_mistral`` (with a sliding window), ``tiny_qwen2``, ``tiny_qwen3``: small models the CPU
  tests run end to end.

Each row: median ms/step over the timed steps (after warm-up), tokens/s, model TFLOP/s, peak memory, final
loss, ratios against the HF BF16 row of the same shape in the same run, and on a GPU the median SM clock and
power draw during the timed steps (:mod:`te_llama.bench.gpu_power`). A peer that is not installed is a
``skipped`` row. Model FLOPs per step: ``6 * N * T + 6 * L * s * d_attn * T`` with ``N`` the parameters that
take part in matrix products (decoder layers and LM head; not the embedding lookup), ``T`` tokens, ``L``
layers, ``s`` sequence length, ``d_attn`` query heads x head dim (causal attention: half the score matrix).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from te_llama.training.adamw import AdamW
from te_llama.training.adamw import describe as describe_optimizer
from te_llama.bench.gpu_power import PowerSampler
from te_llama.bench.variants import BASELINE, LORA, SUITE, BenchmarkArgumentError, Variant
from te_llama.model.families import FAMILIES, family_of
from te_llama.model.layer import head_dim

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
# The other families' 7-8B models, as their config.json files on the Hugging Face Hub give them.
MISTRAL_7B_V03 = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
                      rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
QWEN2_5_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                  num_key_value_heads=4, rope_theta=1000000.0, max_position_embeddings=131072, rms_norm_eps=1e-6,
                  use_sliding_window=False, tie_word_embeddings=False)
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960,
                rms_norm_eps=1e-6, attention_bias=False, use_sliding_window=False, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)


@dataclass(frozen=True)
class Shape:
    layers: int
    batch: int
    seq: int
    optimizer: bool
    config: dict
    model_type: str = "llama"
    cpu: bool = False
    """Small enough for a CPU (the tests run it)."""

    def model_config(self):
        """The shape's HF config, of its family's config class (``LlamaConfig``, ``MistralConfig``, ...)."""
        return FAMILIES[self.model_type].config_class(**{**self.config, "num_hidden_layers": self.layers})


SHAPES = {
    "A": Shape(8, 2, 4096, True, LLAMA3_8B),
    "B": Shape(32, 1, 4096, False, LLAMA3_8B),
    "C": Shape(16, 8, 256, True, LLAMA3_8B),
    "mistral": Shape(8, 2, 4096, True, MISTRAL_7B_V03, "mistral"),
    "qwen2": Shape(8, 2, 4096, True, QWEN2_5_7B, "qwen2"),
    "qwen3": Shape(8, 2, 4096, True, QWEN3_8B, "qwen3"),
    "tiny": Shape(2, 2, 64, True, TINY, cpu=True),
    "tiny_mistral": Shape(2, 2, 64, True, {**TINY, "sliding_window": 32}, "mistral", cpu=True),
    "tiny_qwen2": Shape(2, 2, 64, True, TINY, "qwen2", cpu=True),
    "tiny_qwen3": Shape(2, 2, 64, True, {**TINY, "head_dim": 48}, "qwen3", cpu=True),
}
VARIANTS = SUITE  # the default suite (te_llama.bench.variants)
RESULT_PREFIX = "BENCH_RESULT "


def model_flops_per_step(config, batch: int, seq: int) -> float:
    """Training FLOPs of one forward + backward (see the module docstring for the formula)."""
    hidden, layers, head = config.hidden_size, config.num_hidden_layers, head_dim(config)
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config.intermediate_size
    matmul_params = layers * per_layer + config.vocab_size * hidden  # LM head (tied or not)
    tokens = batch * seq
    return 6 * matmul_params * tokens + 6 * layers * seq * q * tokens


class Skipped(Exception):
    """The variant cannot run here (peer not installed, no GPU, recipe unsupported)."""


def _peer(module: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Skipped(f"{pip_name} is not installed ({error})") from error


def build_model(name: str, shape: Shape, device: torch.device):
    """The model for variant ``name``, bf16 parameters, built directly on ``device``: te-llama's class of the shape's
    family for te-llama's variants, HF's class of that family for the peers."""
    variant = Variant.parse(name)
    config = shape.model_config()
    family = family_of(config)
    from te_llama.model.auto import AutoModelForCausalLM
    from te_llama.model.modeling import default_dtype

    if variant.is_te:
        if device.type != "cuda":
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, device=device, backend="reference")
        else:
            from te_llama.training.fp8 import FP8ConfigError

            try:
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, device=device, backend="te",
                                                         fp8=variant.fp8_config())
            except FP8ConfigError as error:
                raise Skipped(str(error)) from error
            if variant.cuda_graphs:
                model.enable_cuda_graphs()
        model.cache_fp8_weights = variant.weight_cache
        if not variant.lora:
            return model
        model = with_lora(model)
        if variant.fp8_weights:
            model.get_base_model().quantize_frozen_weights(for_training=True)
        return model
    if name == "liger":  # apply_liger_kernel_to_llama, _mistral, _qwen2, _qwen3
        getattr(_peer("liger_kernel.transformers", "liger-kernel"), f"apply_liger_kernel_to_{family.model_type}")()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config._attn_implementation = "sdpa"
    # Training needs no KV cache (te-llama's model does not make one). With HF's default use_cache=True every
    # layer passes its own layer_idx to the cache, so a compiled layer recompiles for each layer and dynamo's
    # recompile limit (8) leaves the layers after the eighth uncompiled.
    config.use_cache = False
    with default_dtype(dtype), torch.device(device):
        model = family.hf_class("ForCausalLM")(config)
    if name == "torchao_fp8":
        float8 = _peer("torchao.float8", "torchao")
        float8.convert_to_float8_training(model, module_filter_fn=lambda module, name: name != "lm_head")
    if variant.compiled:
        compile_regions(model)
    return with_lora(model) if variant.lora else model


def with_lora(model):
    """``model`` under PEFT LoRA with the benchmark's adapters (:data:`te_llama.bench.variants.LORA`)."""
    peft = _peer("peft", "peft")
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))


def compile_regions(model) -> None:
    """``torch.compile`` each decoder layer and the loss function, as torchtitan compiles its blocks.

    The layers share one compiled graph (compiled once, not once per layer; needs ``use_cache=False``), which
    keeps compile time to seconds instead of minutes for a 32-layer model; the compiled loss fuses HF's float32
    upcast of the logits into the cross-entropy, as compiling the whole model does.
    """
    for layer in model.model.layers:
        layer.compile()
    model.loss_function = torch.compile(model.loss_function)


def training_step(model, ids: torch.Tensor, optimizer, phase=None) -> torch.Tensor:
    """One benchmark step: forward with labels, backward, optimizer step (if any), gradients freed.
    ``phase``: called with ``"forward"``, ``"backward"``, ``"optimizer"``, a context manager around each (the
    profiler's ranges, ``benchmarks/profile_step.py``)."""
    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("forward"):
        loss = model(input_ids=ids, labels=ids).loss
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        if optimizer is not None:
            optimizer.step()
        (optimizer or model).zero_grad(set_to_none=True)
    return loss


def prepare_variant(variant: str, shape: Shape, device: torch.device):
    """(model in training mode, optimizer or ``None``, token batch) for one benchmark variant, seeded."""
    torch.manual_seed(0)
    model = build_model(variant, shape, device)
    model.train()
    optimizer = None
    spec = Variant.parse(variant)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if shape.optimizer and spec.is_te and not spec.lora:  # te-llama's own AdamW (te_llama.training.adamw)
        optimizer = AdamW(trainable, lr=1e-5)
    elif shape.optimizer:  # what users of the peers pick, and both sides of a LoRA row: torch's fused AdamW
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, shape.config["vocab_size"], (shape.batch, shape.seq), device=device)
    return model, optimizer, ids


def timed_ms(run, device_type: str = "cuda"):
    """``(milliseconds, result)`` of one call of ``run``, timed as the benchmark times a step: CUDA events around
    it and a wait for the GPU after it (each step starts from an idle GPU); wall clock on a CPU."""
    if device_type != "cuda":
        start = time.perf_counter()
        result = run()
        return 1000 * (time.perf_counter() - start), result
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    result = run()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end), result


def median_ms(run, repeats: int, warmup: int, device_type: str = "cuda") -> float:
    """Median of ``repeats`` :func:`timed_ms` calls of ``run``, after ``warmup`` untimed calls (the benchmark
    scripts' timing of one operation)."""
    for _ in range(warmup):
        run()
    return statistics.median(timed_ms(run, device_type)[0] for _ in range(repeats))


def time_steps(model, ids: torch.Tensor, optimizer, steps: int) -> tuple[list[float], torch.Tensor | None]:
    """Milliseconds of each of ``steps`` training steps (:func:`timed_ms`) and the last step's loss."""
    times, loss = [], None
    for _ in range(steps):
        ms, loss = timed_ms(lambda: training_step(model, ids, optimizer), ids.device.type)
        times.append(ms)
    return times, loss


def run_variant(variant: str, shape_name: str, steps: int, warmup: int) -> dict:
    """Build, warm up and time one variant in this process; returns its row."""
    shape = SHAPES[shape_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (reason := skip_reason(variant, shape_name)) is not None:
        raise Skipped(reason)
    started = time.perf_counter()
    model, optimizer, ids = prepare_variant(variant, shape, device)
    built = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    time_steps(model, ids, optimizer, warmup)
    warm = time.perf_counter()
    with PowerSampler() as gpu_power:
        times, loss = time_steps(model, ids, optimizer, steps)
    ms = statistics.median(times)
    tokens = shape.batch * shape.seq
    flops = model_flops_per_step(shape.model_config(), shape.batch, shape.seq)
    row = {"variant": variant, "shape": shape_name, "status": "ok", "ms_per_step": ms,
           "tokens_per_s": tokens / ms * 1000, "model_tflops": flops / ms / 1e9,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
           "final_loss": float(loss), "timed_steps": len(times), "optimizer": describe_optimizer(optimizer),
           "seconds": {"build": round(built - started, 1), "warmup": round(warm - built, 1),
                       "timed": round(time.perf_counter() - warm, 1)},
           "gpu_power": gpu_power.summary()}  # SM clock and power draw during the timed steps (te_llama.bench.gpu_power)
    if Variant.parse(variant).is_te and device.type == "cuda":
        from te_llama.backend import te_attention_backend
        from te_llama.training.fp8 import describe as describe_fp8

        row["attention_backend"] = te_attention_backend()
        row["fp8"] = describe_fp8(model.fp8_config) if model.fp8_config else None  # recipe, accumulation
        row["fp8_weight_reuses"] = model.fp8_weight_reuses()  # forwards that reused the FP8 weight cast
    return row


def _release_gpu() -> None:
    """Free what the previous shape left behind, so the next shape's peak memory is its own."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    if "transformer_engine.pytorch" in sys.modules:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager

        FP8GlobalStateManager.reset()


def _worker(args) -> None:
    for shape in args.shapes.split(","):
        try:
            row = run_variant(args.worker, shape, args.steps, args.warmup)
        except Skipped as reason:
            row = {"variant": args.worker, "shape": shape, "status": "skipped", "reason": str(reason)}
        except torch.cuda.OutOfMemoryError as error:
            row = {"variant": args.worker, "shape": shape, "status": "oom", "reason": str(error).splitlines()[0]}
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        _release_gpu()


def environment() -> dict:
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "transformers", "transformer_engine", "liger_kernel", "torchao", "te-llama"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["te-llama"] is None:  # run from a source tree without installing
        from te_llama import __version__

        versions["te-llama"] = __version__
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "versions": versions}


def _parse_rows(stdout: str | bytes | None) -> list[dict]:
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    return [json.loads(line[len(RESULT_PREFIX):]) for line in (stdout or "").splitlines()
            if line.startswith(RESULT_PREFIX)]


def skip_reason(name: str, shape: str = "tiny") -> str | None:
    """Why variant ``name`` cannot run ``shape`` on this machine, found without starting a process (no GPU, a peer
    that is not installed, an FP8 recipe this GPU lacks), or ``None``."""
    import importlib.util

    variant = Variant.parse(name)
    if variant.lora and variant.cuda_graphs:
        return "CUDA graphs do not record PEFT adapters"
    if variant.lora and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    if variant.weight_cache and SHAPES[shape].optimizer:
        return (f"the FP8 weight cache reuses a cast only between optimizer steps, and shape {shape} steps the "
                "optimizer after every pass")
    if variant.recipe is not None:
        from te_llama.training.fp8 import FP8ConfigError

        try:
            variant.fp8_config()
        except FP8ConfigError as error:
            return str(error)
    if not torch.cuda.is_available():
        if not SHAPES[shape].cpu:
            return f"shape {shape} needs a CUDA GPU (use --shapes tiny on a CPU)"
        return None if name in ("hf_bf16", "te_bf16", "hf_bf16_lora", "te_bf16_lora") else "needs a CUDA GPU"
    peers = {"liger": ("liger_kernel", "liger-kernel"), "torchao_fp8": ("torchao", "torchao")}
    if name in peers and importlib.util.find_spec(peers[name][0]) is None:
        return f"{peers[name][1]} is not installed"
    if variant.recipe is not None and importlib.util.find_spec("transformer_engine") is not None:
        from te_llama.training.fp8 import FP8ConfigError, te_recipe

        try:
            te_recipe(variant.fp8_config())
        except FP8ConfigError as error:
            return str(error)
    return None


def _run_worker(variant: str, shapes: list[str], steps: int, warmup: int, timeout: int) -> list[dict]:
    """One process for ``variant`` over ``shapes``: its rows, with a failed row for each shape it did not report."""
    extra_warmup = 3 if Variant.parse(variant).compiled else 0
    command = [sys.executable, "-m", "te_llama.bench.suite", "--worker", variant, "--shapes", ",".join(shapes),
               "--steps", str(steps), "--warmup", str(warmup + extra_warmup)]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout * len(shapes),
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rows, failure = _parse_rows(result.stdout), (result.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired as error:
        rows, failure = _parse_rows(error.stdout), f"timeout after {timeout * len(shapes)} s"
    reported = {row["shape"] for row in rows}
    rows += [{"variant": variant, "shape": shape, "status": "failed", "reason": failure[:300]}
             for shape in shapes if shape not in reported]
    for row in rows:
        row["process_s"] = round(time.perf_counter() - started, 1)  # start-up included: where the suite's time goes
    return rows


def run_suite(shapes: list[str], variants: list[str], steps: int = 10, warmup: int = 3,
              timeout: int = 600, on_row=None) -> list[dict]:
    """Each variant in its own process on the same GPU, one after the other; a process runs the shapes in turn
    (a fresh model each, memory released in between). ``timeout`` is per shape."""
    rows = []
    for variant in variants:
        skipped = {shape: reason for shape in shapes if (reason := skip_reason(variant, shape)) is not None}
        new = [{"variant": variant, "shape": shape, "status": "skipped", "reason": reason}
               for shape, reason in skipped.items()]
        to_run = [shape for shape in shapes if shape not in skipped]
        if to_run:
            new += _run_worker(variant, to_run, steps, warmup, timeout)
        for row in new:
            rows.append(row)
            add_ratios(rows)
            print(format_row(row), flush=True)
        if on_row is not None:
            on_row(rows)
    order = {name: i for i, name in enumerate(variants)}
    rows.sort(key=lambda row: (shapes.index(row["shape"]), order[row["variant"]]))
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed-up and memory ratio of each row against the HF BF16 row of the same shape; LoRA rows also against
    HF + PEFT LoRA (``*_vs_hf_bf16_lora``)."""
    base = {(r["variant"], r["shape"]): r for r in rows if r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        baseline = Variant.parse(row["variant"]).baseline
        reference = base.get((baseline, row["shape"]))
        if baseline != BASELINE and reference:
            row[f"speedup_vs_{baseline}"] = reference["ms_per_step"] / row["ms_per_step"]
            if row.get("peak_memory_gib") and reference.get("peak_memory_gib"):
                row[f"memory_vs_{baseline}"] = row["peak_memory_gib"] / reference["peak_memory_gib"]
        reference = base.get((BASELINE, row["shape"]))
        if row["status"] == "ok" and reference:
            row["speedup_vs_hf_bf16"] = reference["ms_per_step"] / row["ms_per_step"]
            for key, ratio in (("peak_memory_gib", "memory_vs_hf_bf16"), ("peak_reserved_gib", "reserved_vs_hf_bf16")):
                if row.get(key) and reference.get(key):
                    row[ratio] = row[key] / reference[key]


HEADER = f"{'shape':5s} {'variant':36s} {'ms/step':>9s} {'speedup':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} " \
         f"{'peak GiB':>9s} {'mem ratio':>9s} {'reserved':>9s} {'res ratio':>9s} {'loss':>7s} {'SM MHz':>7s} {'W':>5s}"


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['shape']:5s} {row['variant']:36s} {row['status']}: {row.get('reason', '')}"
    def column(key, spec):
        return format(row[key], spec) if row.get(key) is not None else f"{'-':>9s}"

    baseline = Variant.parse(row["variant"]).baseline  # LoRA rows: against HF + PEFT
    speedup = f"{row[f'speedup_vs_{baseline}']:7.2f}x" if f"speedup_vs_{baseline}" in row else f"{'':8s}"
    return (f"{row['shape']:5s} {row['variant']:36s} {row['ms_per_step']:9.1f} {speedup} {row['tokens_per_s']:10.0f} "
            f"{row['model_tflops']:8.1f} {column('peak_memory_gib', '9.1f')} {column(f'memory_vs_{baseline}', '9.2f')} "
            f"{column('peak_reserved_gib', '9.1f')} {column('reserved_vs_hf_bf16', '9.2f')} {row['final_loss']:7.3f}"
            f"{_power_columns(row.get('gpu_power'))}")


def _power_columns(power: dict | None) -> str:
    """Median SM clock and power draw during the timed steps, where they were read."""
    return f" {power['sm_clock_mhz']:7.0f} {power['power_w']:5.0f}" if power else ""


def write_report(rows: list[dict], path: str, command: str, suite_s: float | None = None) -> dict:
    report = {"command": command, "environment": environment(), "suite_s": suite_s, "rows": rows}
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(partial, path)
    return report


def bench(shapes: str = "A,B,C", variants: str = ",".join(VARIANTS), steps: int = 10, warmup: int = 3,
          output: str = "bench.json", timeout: int = 600) -> list[dict]:
    """Run the suite, print the table, write ``output`` (JSON with GPU and versions)."""
    shape_list, variant_list = shapes.split(","), variants.split(",")
    unknown = [s for s in shape_list if s not in SHAPES]
    if unknown:
        raise BenchmarkArgumentError(f"unknown shape: {', '.join(unknown)} (shapes: {', '.join(SHAPES)})")
    for name in variant_list:
        Variant.parse(name)  # an unknown name is an error that says how names are made
    env = environment()
    print(f"GPU: {env['gpu']}  " + "  ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    print(HEADER)
    command = " ".join(["te-llama", "bench", "--shapes", shapes, "--variants", variants])
    started = time.perf_counter()
    rows = run_suite(shape_list, variant_list, steps, warmup, timeout,
                     on_row=lambda done: write_report(done, output, command))  # partial results survive a kill
    suite_s = time.perf_counter() - started
    write_report(rows, output, command, suite_s)
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    print(f"suite: {len(rows)} rows in {suite_s / 60:.1f} min")
    return rows


def parse_variant(name: str) -> str:
    try:
        Variant.parse(name)
    except BenchmarkArgumentError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description="one benchmark variant (internal: used by te-llama bench)")
    parser.add_argument("--worker", required=True, type=parse_variant)
    parser.add_argument("--shapes", required=True, help="comma-separated, run one after the other")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    _worker(parser.parse_args())


if __name__ == "__main__":
    main()
