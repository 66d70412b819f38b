#!/usr/bin/env bash
# The GPU evidence behind README.md and docs/: the GPU tests and the `te-llama bench` runs the docs cite, on one GPU
# with Transformer Engine, each stage's log and JSON in OUT.
#
#   bash benchmarks/gpu_evidence.sh OUT [STAGE ...]
#
# Stages (default: all, in this order; about 5 + 2 + 3 + 6 + 2.5 + 4 minutes on an H100, so one call of at most
# ten minutes takes two or three of them):
#   tests       pytest -m gpu tests/gpu (one GPU; the multi-GPU tests skip), JUnit XML and the tests' records
#   training    te-llama bench --shapes A,B: HF BF16, FP8 delayed, FP8 delayed + CUDA graphs
#   families    te-llama bench --shapes mistral,qwen2,qwen3: HF BF16 against FP8 delayed, per family
#   generation  te-llama bench --generation: HF DynamicCache, HF static cache + compile, te-llama BF16 (+ graphs),
#               te-llama FP8 (+ graphs, + the weights kept in FP8 only)
#   lora        te-llama bench --shapes A with HF + PEFT LoRA against te-llama FP8 LoRA (on a base kept in FP8 too),
#               and its step profile
#   packed      te-llama bench --packed: padded and padding-free HF against te-llama padding-free (+ CUDA graphs)
#
# A GPU machine without gensim or the network needs the packed stage's token file made on another machine first:
# `python -c "from te_llama.bench.packed_sft import corpus_tokens; corpus_tokens()"` writes
# $TE_LLAMA_CACHE/bench_corpus.pt (default ~/.cache/te-llama); point TE_LLAMA_CACHE at a copy of it there.
set -o pipefail
out=${1:?usage: gpu_evidence.sh OUT [tests|training|families|generation|lora|packed ...]}
shift
stages=${*:-tests training families generation lora packed}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench() {  # bench NAME ARGS...: one te-llama bench invocation, its table in NAME.log and its rows in NAME.json
  local name=$1
  shift
  python3 -m te_llama bench "$@" --output "$out/$name.json" 2>&1 | grep --line-buffered -v Warning | tee "$out/$name.log"
}
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, transformer_engine as te; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'transformer_engine', te.__version__)" | tee -a "$out/gpu.txt"
for stage in $stages; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests) TE_LLAMA_REPORT="$out/gpu_tests.json" python3 -m pytest -m gpu tests/gpu -q -rfEs \
             -p no:cacheprovider --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" | tail -40 ;;
    training) bench bench_AB --shapes A,B --variants hf_bf16,te_fp8_delayed,te_fp8_delayed_graphs ;;
    families) bench bench_families --shapes mistral,qwen2,qwen3 --variants hf_bf16,te_fp8_delayed ;;
    generation) bench bench_generation --generation --shapes 8B-b1,1B-b64,1B-b1 \
                  --variants hf_dynamic,hf_static_compile,te_bf16,te_bf16_graphs,te_fp8_current,te_fp8_current_graphs,te_fp8_current_graphs_fp8weights ;;
    lora) bench bench_lora --shapes A --variants hf_bf16_lora,te_fp8_delayed_lora,te_fp8_delayed_lora_fp8weights
          python3 benchmarks/profile_step.py --variant te_fp8_delayed_lora --shape A --top 30 \
            --out "$out/profile_lora.json" 2>&1 | grep -v Warning | tee "$out/profile_lora.log" | tail -40 ;;
    packed) bench bench_packed --packed ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
