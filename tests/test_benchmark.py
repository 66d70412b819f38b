"""The benchmark code itself, on CPU: FLOP counting, subprocess workers, table and JSON, skipped peers."""

import json

import pytest
import torch

from te_llama.bench import suite as benchmark
from te_llama.bench.suite import SHAPES, Skipped, _peer, add_ratios, format_row, model_flops_per_step, run_suite
from te_llama.cli import main


def test_flops_formula_by_hand():
    config = SHAPES["A"].model_config()
    h, i, v, layers, seq, tokens = 4096, 14336, 128256, 8, 4096, 2 * 4096
    per_layer = h * 4096 + 2 * h * 1024 + 4096 * h + 3 * h * i
    expected = 6 * (layers * per_layer + v * h) * tokens + 6 * layers * seq * 4096 * tokens
    assert model_flops_per_step(config, 2, 4096) == expected
    # Llama-3-8B (32 layers): ~7.5B matmul parameters -> 6*N*T dominates
    full = SHAPES["B"].model_config()
    assert 7.4e9 < (model_flops_per_step(full, 1, 1) - 6 * 32 * 4096) / 6 < 7.6e9


def test_missing_peer_is_a_skip_with_the_reason():
    with pytest.raises(Skipped, match="not-a-peer is not installed"):
        _peer("not_a_real_module_xyz", "not-a-peer")


def test_suite_runs_variants_in_processes_and_reports(tmp_path, capsys):
    rows = run_suite(["tiny"], ["hf_bf16", "te_bf16", "liger", "te_fp8_current"], steps=2, warmup=1)
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["hf_bf16"]["status"] == by_variant["te_bf16"]["status"] == "ok"
    assert by_variant["liger"]["status"] == "skipped" and by_variant["liger"]["reason"]
    assert (by_variant["te_fp8_current"]["status"], by_variant["te_fp8_current"]["reason"]) == ("skipped",
                                                                                                 "needs a CUDA GPU")
    assert set(by_variant["te_bf16"]["seconds"]) == {"build", "warmup", "timed"}
    assert by_variant["hf_bf16"]["speedup_vs_hf_bf16"] == 1.0
    assert by_variant["te_bf16"]["tokens_per_s"] > 0 and by_variant["te_bf16"]["final_loss"] > 0
    assert all(row["process_s"] > 0 for row in rows if row["status"] == "ok")  # startup and compile included
    assert "process_s" not in by_variant["liger"]  # skipped without starting a process
    table = "\n".join(format_row(r) for r in rows)
    assert "skipped" in table and "te_bf16" in table


def test_a_process_past_its_timeout_is_a_failed_row():
    rows = run_suite(["tiny"], ["te_bf16"], steps=2, warmup=1, timeout=0.5)
    assert rows[0]["status"] == "failed" and rows[0]["reason"] == "timeout after 0.5 s"


def test_lora_rows_run_peft_on_both_sides_and_compare_with_hf_peft():
    from te_llama.bench.suite import skip_reason
    from te_llama.bench.variants import Variant

    assert Variant.parse("te_fp8_delayed_lora") == Variant("te_fp8_delayed_lora", "te", recipe="delayed", lora=True)
    assert Variant.parse("hf_bf16_lora").lora and Variant.parse("te_bf16_lora").baseline == "hf_bf16_lora"
    assert skip_reason("te_fp8_delayed_graphs_lora", "tiny") == "CUDA graphs do not record PEFT adapters"
    rows = run_suite(["tiny"], ["hf_bf16", "hf_bf16_lora", "te_bf16_lora"], steps=2, warmup=1)
    by_variant = {row["variant"]: row for row in rows}
    assert all(row["status"] == "ok" for row in rows), rows
    assert by_variant["te_bf16_lora"]["speedup_vs_hf_bf16_lora"] > 0
    assert "speedup_vs_hf_bf16" in by_variant["te_bf16_lora"]  # and against full fine-tuning, as ever


def test_family_shapes_build_each_familys_hf_class_and_its_te_llama_class():
    import transformers

    from te_llama.bench.suite import build_model, skip_reason
    from te_llama.model.layer import head_dim

    for shape, hf_name in (("tiny_mistral", "MistralForCausalLM"), ("tiny_qwen2", "Qwen2ForCausalLM"),
                           ("tiny_qwen3", "Qwen3ForCausalLM")):
        hf = build_model("hf_bf16", SHAPES[shape], torch.device("cpu"))
        te = build_model("te_bf16", SHAPES[shape], torch.device("cpu"))
        assert type(hf) is getattr(transformers, hf_name)
        assert isinstance(te, type(hf)) and type(te).__name__ == "TE" + hf_name
    sizes = {name: (type(config).__name__, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                    config.num_attention_heads, config.num_key_value_heads, head_dim(config), config.vocab_size)
             for name in ("mistral", "qwen2", "qwen3") for config in [SHAPES[name].model_config()]}
    assert sizes == {"mistral": ("MistralConfig", 8, 4096, 14336, 32, 8, 128, 32768),
                     "qwen2": ("Qwen2Config", 8, 3584, 18944, 28, 4, 128, 152064),
                     "qwen3": ("Qwen3Config", 8, 4096, 12288, 32, 8, 128, 151936)}
    assert SHAPES["mistral"].model_config().sliding_window is None  # Mistral-7B-v0.3 attends to all keys
    assert all((SHAPES[name].batch, SHAPES[name].seq, SHAPES[name].optimizer) == (2, 4096, True)
               for name in ("mistral", "qwen2", "qwen3"))
    assert skip_reason("hf_bf16", "qwen3") == "shape qwen3 needs a CUDA GPU (use --shapes tiny on a CPU)"


def test_family_rows_run_against_the_same_familys_hf_row():
    rows = run_suite(["tiny_mistral", "tiny_qwen2", "tiny_qwen3"], ["hf_bf16", "te_bf16"], steps=1, warmup=0)
    assert [(row["shape"], row["variant"], row["status"]) for row in rows] == [
        (shape, variant, "ok") for shape in ("tiny_mistral", "tiny_qwen2", "tiny_qwen3")
        for variant in ("hf_bf16", "te_bf16")]
    assert all(row["speedup_vs_hf_bf16"] > 0 for row in rows)


def test_ratios_are_against_the_same_shape():
    rows = [dict(variant="hf_bf16", shape="A", status="ok", ms_per_step=200.0, peak_memory_gib=40.0),
            dict(variant="te_fp8_delayed", shape="A", status="ok", ms_per_step=100.0, peak_memory_gib=30.0),
            dict(variant="te_fp8_delayed", shape="B", status="ok", ms_per_step=50.0, peak_memory_gib=30.0)]
    add_ratios(rows)
    assert rows[1]["speedup_vs_hf_bf16"] == 2.0 and rows[1]["memory_vs_hf_bf16"] == 0.75
    assert "speedup_vs_hf_bf16" not in rows[2]


def test_cli_writes_json_with_environment(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shapes", "tiny", "--variants", "hf_bf16,te_bf16", "--steps", "2", "--warmup", "1",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["gpu"] == "cpu" and report["environment"]["versions"]["torch"]
    assert [r["variant"] for r in report["rows"]] == ["hf_bf16", "te_bf16"]
    assert "ms/step" in capsys.readouterr().out
    assert main(["bench", "--shapes", "Z"]) == 2


def _profile_step_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel, expected", [
    ("nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT", "gemm"),
    ("cast_transpose_optimized_kernel(__nv_bfloat16 const*, float const*, __nv_fp8_e4m3*", "fp8 cast/transpose/amax"),
    ("void transformer_engine::(anonymous namespace)::amax_kernel<16, true, __nv_bfloat16>", "fp8 cast/transpose/amax"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy", "other (elementwise, copies)"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>", "optimizer"),
    ("void transformer_engine::dgated_act_kernel<16, true, float>", "activation"),
])
def test_profiler_kernel_categories(kernel, expected):
    """PyTorch's ``..._nocast`` elementwise kernels are not FP8 casts (they once were counted as such)."""
    assert _profile_step_module().category(kernel) == expected


def test_idle_gaps_are_charged_to_the_range_that_launched_the_next_kernel():
    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}

    trace = [
        x("user_annotation", "fwd TELlamaDecoderLayer", 0, 100),
        x("cpu_op", "aten::mm", 5, 5), x("cuda_runtime", "cudaLaunchKernel", 6, 1, correlation=1),
        x("cpu_op", "aten::add", 60, 5), x("cuda_runtime", "cudaLaunchKernel", 61, 1, correlation=2),
        x("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 200, 50),
        x("cuda_runtime", "cudaLaunchKernel", 210, 1, correlation=3),
        x("kernel", "gemm", 10, 20, tid=7, correlation=1),       # busy 10..30
        x("kernel", "add", 62, 3, tid=7, correlation=2),         # 32 us gap, launched inside the layer's forward
        x("kernel", "gemm_bwd", 215, 10, tid=7, correlation=3),  # 150 us gap, launched by the backward node
        {"ph": "i", "name": "marker", "ts": 0},
    ]
    gaps = _profile_step_module().charge_gaps(trace, threshold_us=20)
    assert gaps["gaps"] == 2 and gaps["gaps_ms"] == pytest.approx(0.182)
    assert gaps["gap_ms_by_launching_range"] == {"autograd::engine::evaluate_function: MmBackward0": 0.15,
                                                 "fwd TELlamaDecoderLayer": 0.032}
    assert gaps["largest_gaps"][0] == (0.15, "gemm_bwd") and gaps["step_span_ms"] == pytest.approx(0.215)


def test_step_timeline_splits_a_timed_step_into_lead_and_phases():
    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}

    trace = [
        x("user_annotation", "timed_step", 0, 1000),
        x("user_annotation", "phase forward", 10, 300), x("user_annotation", "phase backward", 320, 200),
        x("user_annotation", "phase optimizer", 530, 400),
        x("python_function", "slow_setup", 12, 250), x("python_function", "quick", 20, 5),
        x("cuda_runtime", "cudaLaunchKernel", 300, 2, correlation=1),
        x("cuda_runtime", "cudaLaunchKernel", 400, 2, correlation=2),
        x("cuda_runtime", "cudaMalloc", 540, 300),
        x("cuda_runtime", "cudaLaunchKernel", 900, 2, correlation=3),
        x("kernel", "embedding", 305, 100, correlation=1),  # lead: 305 us of host before the first kernel
        x("kernel", "gemm_bwd", 405, 200, correlation=2),
        x("kernel", "adamw", 905, 90, correlation=3),
    ]
    (step,) = _profile_step_module().step_timelines(trace, [1.0], slow_us=200)
    assert step["lead_ms"] == pytest.approx(0.305) and step["kernel_span_ms"] == pytest.approx(0.69)
    assert step["gpu_busy_ms"] == pytest.approx(0.39) and step["host_after_last_kernel_ms"] == pytest.approx(0.005)
    assert step["phases"]["forward"] == {"host_ms": 0.3, "gpu_busy_ms": 0.1, "gpu_span_ms": 0.1,
                                         "gpu_start_ms": pytest.approx(0.305), "kernels": 1,
                                         "gap_ms_by_size": {}, "gaps_by_size": {}}
    assert step["phases"]["optimizer"]["gpu_busy_ms"] == pytest.approx(0.09)
    assert step["slow_runtime_calls"] == [("cudaMalloc", 0.3, 0.54)]
    assert step["python_in_lead_ms"] == {"slow_setup": 0.25} and step["graph_launches_ms"] == []


def test_step_timeline_with_cuda_graphs_reports_launches_and_gaps_by_size():
    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}

    trace = [
        x("user_annotation", "timed_step", 0, 2000), x("user_annotation", "phase forward", 10, 1500),
        x("python_function", "before_launch", 20, 400), x("python_function", "after_launch", 700, 400),
        x("cuda_runtime", "cudaLaunchKernel", 15, 2, correlation=1),
        x("cuda_runtime", "cudaGraphLaunch", 1200, 100), x("cuda_runtime", "cudaGraphLaunch", 500, 150),
        x("kernel", "embedding", 20, 10, correlation=1),
        x("kernel", "norm", 700, 100, correlation=2), x("kernel", "gemm", 802, 300, correlation=3),
        x("kernel", "add", 1110, 10, correlation=4), x("kernel", "attention", 1300, 50, correlation=5),
        x("cuda_runtime", "cudaLaunchKernel", 1210, 2, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", 1220, 2, correlation=3),
        x("cuda_runtime", "cudaLaunchKernel", 1230, 2, correlation=4),
        x("cuda_runtime", "cudaLaunchKernel", 1240, 2, correlation=5),
    ]
    (step,) = _profile_step_module().step_timelines(trace, [2.0], slow_us=200)
    assert step["graph_launches_ms"] == [(0.5, 0.15), (1.2, 0.1)]  # in time order
    assert step["python_in_lead_ms"] == {"before_launch": 0.4}  # up to the first graph launch
    forward = step["phases"]["forward"]
    assert forward["kernels"] == 5
    assert forward["gaps_by_size"] == {">=100us": 2, "<5us": 1, "<20us": 1}
    assert forward["gap_ms_by_size"] == {"<20us": 0.008, "<5us": 0.002, ">=100us": 0.85}


def test_host_syncs_are_reported_with_their_callers(monkeypatch):
    import warnings

    profile_step = _profile_step_module()

    def step(model, ids, optimizer):
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")

    monkeypatch.setattr(profile_step, "training_step", step)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    syncs = profile_step.host_syncs(None, None, None)
    (callers, count), = syncs.items()
    assert count == 1 and callers.startswith("test_benchmark.py:") and callers.split(" <- ")[0].endswith(" step")


def test_skip_reason_without_starting_a_process(monkeypatch):
    import importlib.util

    from te_llama.bench.suite import skip_reason

    assert skip_reason("hf_bf16") is None
    assert skip_reason("hf_bf16", "B") == "shape B needs a CUDA GPU (use --shapes tiny on a CPU)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    assert skip_reason("liger") == "liger-kernel is not installed"


def test_compiled_peers_compile_one_layer_graph_for_all_layers():
    """HF's default use_cache=True made each layer recompile until dynamo's limit of 8, leaving later layers of
    the 16- and 32-layer shapes uncompiled; the peers now build their models without a KV cache."""
    import torch._dynamo.utils

    from te_llama.bench.suite import SHAPES, Shape, build_model, compile_regions

    shape = Shape(10, 2, 32, True, SHAPES["tiny"].config)
    model = build_model("hf_bf16", shape, torch.device("cpu"))
    assert model.config.use_cache is False
    compile_regions(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(0, 512, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one decoder-layer graph, one loss graph
    torch._dynamo.reset()


def test_gpu_power_summary_from_nvidia_smi_lines():
    from te_llama.bench.gpu_power import PowerSampler, summarize

    lines = "1980, 120.5, 700.00\n1530, 695.1, 700.00\n[N/A], 690.0, 700.00\n1455, 701.3, 700.00\n1605, 688.0, 700.00\n"
    summary = summarize(lines)
    assert summary == {"sm_clock_mhz": 1567.5, "sm_clock_min_mhz": 1455.0, "power_w": 691.55,
                       "power_limit_w": 700.0, "samples": 4}
    assert summarize("") is None and summarize("Field 'clocks.sm' is not a valid field to query.\n") is None
    row = dict(variant="te_fp8_delayed", shape="B", status="ok", ms_per_step=230.0, tokens_per_s=1.0,
               model_tflops=1.0, final_loss=1.0, gpu_power=summary)
    assert format_row(row).split()[-2:] == ["1568", "692"]
    assert len(format_row({**row, "gpu_power": None}).split()) == len(format_row(row).split()) - 2  # not read
    if not torch.cuda.is_available():  # no GPU: nothing sampled, nothing started
        with PowerSampler() as sampler:
            pass
        assert sampler.summary() is None


def test_power_sampler_reads_a_sampling_process_until_the_block_ends(tmp_path, monkeypatch):
    """The process handling, with a stand-in for ``nvidia-smi -lms 50``: started on entry, stopped on exit, its
    lines summarised."""
    import time

    from te_llama.bench import gpu_power

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo '1500, 690.5, 700.00'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_power, "_command", lambda interval_ms: [str(fake)])
    with gpu_power.PowerSampler() as sampler:
        time.sleep(0.5)
    summary = sampler.summary()
    assert summary["sm_clock_mhz"] == 1500 and summary["power_w"] == 690.5 and summary["samples"] >= 3
    assert sampler._process.poll() is not None  # stopped


def test_median_ms_warms_up_then_takes_the_median(monkeypatch):
    times = iter([5.0, 1.0, 9.0])
    monkeypatch.setattr(benchmark, "timed_ms", lambda run, device_type: (next(times), run()))
    calls = []
    assert benchmark.median_ms(lambda: calls.append(1), repeats=3, warmup=2, device_type="cpu") == 5.0
    assert len(calls) == 5  # two untimed calls, then three timed


def test_variant_names_parse_into_one_spec():
    from te_llama.bench.variants import BenchmarkArgumentError, Variant, is_variant

    assert Variant.parse("te_fp8_delayed_fastacc_graphs_cached") == Variant(
        "te_fp8_delayed_fastacc_graphs_cached", "te", recipe="delayed", fast_accumulation=True, cuda_graphs=True,
        weight_cache=True)
    assert Variant.parse("te_bf16_graphs") == Variant("te_bf16_graphs", "te", cuda_graphs=True)
    assert Variant.parse("hf_compile") == Variant("hf_compile", "peer") and Variant.parse("hf_compile").compiled
    assert is_variant("te_fp8_delayed_graphs_cached") and is_variant("te_fp8_current_cached")
    assert is_variant("te_fp8_current_fastacc")
    assert Variant.parse("te_fp8_delayed_lora_fp8weights") == Variant(
        "te_fp8_delayed_lora_fp8weights", "te", recipe="delayed", lora=True, fp8_weights=True)
    for bad in ("te_bf16_cached", "te_bf16_fastacc", "te_fp8_delayed_cached_graphs", "te_fp8_delayed_graphs_fastacc",
                "hf_bf16_cached", "hf_bf16_graphs", "te_fp8_nvfp9", "te_bf16_lora_fp8weights",
                "te_fp8_delayed_fp8weights", "te_fp8_delayed_fp8weights_lora"):
        assert not is_variant(bad), bad
    with pytest.raises(BenchmarkArgumentError, match="followed by _fastacc .FP8., _graphs, _cached .FP8., _lora, "
                                                     "_fp8weights .FP8 LoRA., in that order"):
        Variant.parse("te_fp8_delayed_graphs_fastacc")


def test_variant_fp8_configs_and_skips():
    from te_llama.bench.suite import VARIANTS, BenchmarkArgumentError, bench, skip_reason
    from te_llama.bench.variants import Variant
    from te_llama.training.fp8 import FP8Config

    assert "te_fp8_delayed_fastacc_graphs_cached" in VARIANTS  # the suite shows the fastest opt-in next to the default
    assert len(set(VARIANTS)) == len(VARIANTS)  # each row once
    assert Variant.parse("te_fp8_delayed_fastacc_graphs").fp8_config() == FP8Config(
        recipe="delayed", backward_accumulation="fast")
    assert Variant.parse("te_fp8_current_graphs").fp8_config() == FP8Config(recipe="current")
    assert Variant.parse("te_bf16_graphs").fp8_config() is None
    # a cast is reused only between optimizer steps: shapes that step the optimizer every pass skip the variant
    assert skip_reason("te_fp8_delayed_graphs_cached", "A").startswith("the FP8 weight cache reuses a cast only")
    assert "shape tiny steps the optimizer" in skip_reason("te_fp8_delayed_cached", "tiny")
    assert skip_reason("te_fp8_delayed_graphs_cached", "B") == "shape B needs a CUDA GPU (use --shapes tiny on a CPU)"
    # a combination FP8 cannot run is a skipped row with the reason, found without a GPU
    assert "needs the delayed or current recipe; 'block'" in skip_reason("te_fp8_block_fastacc", "tiny")
    with pytest.raises(BenchmarkArgumentError, match="in that order"):
        bench(shapes="tiny", variants="te_fp8_delayed_graphs_fastacc")
    with pytest.raises(BenchmarkArgumentError, match="unknown shape: Z"):
        bench(shapes="Z", variants="hf_bf16")


def test_cached_variant_turns_the_weight_cache_on():
    from te_llama.bench.suite import SHAPES, build_model

    assert build_model("te_fp8_delayed_cached", SHAPES["tiny"], torch.device("cpu")).cache_fp8_weights
    assert not build_model("te_fp8_delayed", SHAPES["tiny"], torch.device("cpu")).cache_fp8_weights


def test_generation_bench_runs_each_row_in_a_process_and_writes_json(tmp_path, capsys):
    out = tmp_path / "generation.json"
    assert main(["bench", "--generation", "--shapes", "tiny", "--variants",
                 "hf_dynamic,te_bf16,te_bf16_graphs,te_fp8_current", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows.pop("te_fp8_current") == {"variant": "te_fp8_current", "shape": "tiny", "status": "skipped",
                                          "reason": "FP8 needs a GPU"}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["hf_dynamic"]["speedup_vs_hf_dynamic"] == 1.0 and rows["te_bf16"]["ms_per_token"] > 0
    # On the CPU the graph's stand-in serves every step after the prompt's: 4 generations of 32 tokens, 3 of 1
    assert rows["te_bf16_graphs"]["decode_graph_replays"] == 4 * 31
    assert rows["te_bf16"]["time_to_first_token_ms"] > 0 and report["environment"]["gpu"] == "cpu"
    assert main(["bench", "--generation", "--shapes", "A"]) == 2
    assert "unknown generation shape: A" in capsys.readouterr().err


def test_packed_bench_steps_hold_the_same_budget_and_real_text(monkeypatch):
    from te_llama.bench import packed_sft

    monkeypatch.setattr(packed_sft, "corpus_tokens", lambda: torch.arange(5000, dtype=torch.int32) % 4000)
    shape = packed_sft.SHAPES["tiny"]
    padded, flat = (packed_sft.steps_of_documents(shape, 4, padded) for padded in (True, False))
    assert all(len(docs) * max(map(len, docs)) <= shape.budget for docs in padded)
    assert all(sum(map(len, docs)) == shape.budget for docs in flat)
    assert torch.equal(torch.cat(padded[0]), torch.cat(flat[0])[: sum(map(len, padded[0]))])  # one stream
    lengths = [len(doc) for docs in flat for doc in docs[:-1]]
    assert min(lengths) >= shape.min_length and max(lengths) <= shape.max_length and len(set(lengths)) > 3
    batch = packed_sft.flat_batch(flat[0])
    assert (batch["labels"][batch["position_ids"] == 0] == -100).all()


def test_packed_bench_runs_each_row_in_a_process_and_writes_json(tmp_path, capsys, monkeypatch):
    from te_llama.bench import packed_sft

    out = tmp_path / "packed.json"
    assert main(["bench", "--packed", "--shapes", "tiny", "--variants", "hf_bf16_padded,te_bf16_padding_free",
                 "--steps", "2", "--warmup", "1", "--output", str(out)]) == 0
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    te = rows["te_bf16_padding_free"]
    assert te["real_tokens_per_step"] == packed_sft.SHAPES["tiny"].budget and te["documents_per_step"] > 2
    assert rows["hf_bf16_padded"]["real_tokens_per_step"] <= te["real_tokens_per_step"]
    assert "speedup_vs_hf_bf16_padded" in te and "speedup_vs_hf_bf16_padding_free" not in te
    assert packed_sft.run("te_fp8_padding_free_graphs", "tiny")["reason"] == "CUDA graphs need a GPU"
    assert main(["bench", "--packed", "--shapes", "A"]) == 2
    assert "unknown packed shape: A" in capsys.readouterr().err
