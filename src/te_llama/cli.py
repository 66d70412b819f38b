"""``te-llama`` command line: a thin map from subcommands to functions that are also callable from Python."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from te_llama.commands.assets import AssetError
from te_llama.backend import BackendUnavailableError
from te_llama.checkpoint.files import CheckpointError
from te_llama.training.cuda_graphs import CudaGraphError
from te_llama.commands.data import DataError
from te_llama.training.distributed import DataParallelError
from te_llama.training.fp8 import FP8ConfigError
from te_llama.model.layer import UnsupportedConfigError

EXPECTED_ERRORS = (AssetError, BackendUnavailableError, CheckpointError, CudaGraphError, DataError, DataParallelError,
                   FP8ConfigError, UnsupportedConfigError)
EXIT_ERROR, EXIT_OUT_OF_MEMORY, EXIT_INTERRUPTED = 2, 3, 130


def _finetune(args) -> int:
    from te_llama.commands.finetune import FinetuneConfig, finetune

    fields = FinetuneConfig.__dataclass_fields__
    config = FinetuneConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})
    summary = finetune(config)
    return EXIT_INTERRUPTED if summary["status"] == "interrupted" else 0


def _eval(args) -> int:
    from te_llama.commands.finetune import eval_perplexity

    result = eval_perplexity(args.model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                             skip_bad_lines=args.skip_bad_lines, max_blocks=args.max_blocks)
    print(f"perplexity {result['perplexity']:.4f} on {result['blocks']} blocks of {result['seq_len']} tokens")
    print(json.dumps(result, indent=2))
    return 0


def _generate(args) -> int:
    from transformers import AutoTokenizer

    from te_llama.backend import resolve_backend, working_dtype
    from te_llama.commands.generate import generate_text
    from te_llama.model.auto import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=working_dtype(resolve_backend()))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    return 0


def _demo(args) -> int:
    from te_llama.commands.demo import run_demo

    summary = run_demo(output=args.output, eval_tokens=args.eval_tokens, max_new_tokens=args.max_new_tokens,
                       model=args.model)
    ok = summary["round_trip_bit_identical"] and summary["parity"]["relative_error"] < 5e-2
    return 0 if ok else 1


def _convert(args) -> int:
    from te_llama.commands.convert import convert_checkpoint

    report = convert_checkpoint(args.model, args.output, dtype=args.dtype, device=args.device,
                                overwrite=args.overwrite)
    print(json.dumps(report.as_dict(), indent=2))
    print(f"saved HF checkpoint to {args.output}")
    return 0


def _bench(args) -> int:
    if args.packed:
        from te_llama.bench.packed_sft import VARIANTS, bench_packed

        rows = bench_packed(args.shapes or "8B", args.variants or ",".join(VARIANTS), args.output, args.steps,
                            args.warmup, args.timeout)
        return _bench_status(rows)
    if args.generation:
        from te_llama.bench.generation import VARIANTS, bench_generation

        rows = bench_generation(args.shapes or "1B-b1,1B-b16,1B-b64,8B-b1", args.variants or ",".join(VARIANTS),
                                args.output, args.timeout)
        return _bench_status(rows)
    from te_llama.bench.suite import VARIANTS, bench

    rows = bench(shapes=args.shapes or "A,B,C", variants=args.variants or ",".join(VARIANTS), steps=args.steps,
                 warmup=args.warmup, output=args.output, timeout=args.timeout)
    return _bench_status(rows)


def _bench_status(rows: list[dict]) -> int:
    """0 unless a row failed (a skipped row says why in the table); says so where no row ran at all."""
    if rows and all(row["status"] == "skipped" for row in rows):
        print("te-llama bench: every row was skipped (the reasons are in the table); on a machine without a GPU, "
              "--shapes tiny runs", file=sys.stderr)
    return 0 if all(row["status"] in ("ok", "skipped") for row in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="te-llama", description="Hugging Face Llama on Transformer Engine, in FP8")
    parser.add_argument("-v", "--verbose", action="store_true", help="log te-llama's decisions (backend, FP8)")
    commands = parser.add_subparsers(dest="command", required=True)

    tune = commands.add_parser("finetune", help="fine-tune a checkpoint (FP8 on a GPU); embedded default")
    tune.add_argument("--model", default=None, help="HF checkpoint directory: Llama, Mistral, Qwen2 or Qwen3 "
                                                    "(default: embedded SmolLM2-135M-Instruct)")
    tune.add_argument("--data", default=None, help=".txt, .jsonl (text or prompt/completion) or a datasets "
                                                   "directory (default: embedded English text)")
    tune.add_argument("--output", default="te-llama-finetune")
    tune.add_argument("--fp8", default="auto", help="auto, delayed, current, block, mxfp8 or off (auto: FP8 where "
                                                    "the GPU and TE allow, said at start)")
    tune.add_argument("--fp8-backward-accumulation", choices=("split", "fast"), default="split",
                      help="how the FP8 backward GEMMs accumulate (delayed and current recipes): split, TE's default, "
                           "or fast, quicker with more rounding error (README: Fast accumulation)")
    tune.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 300 GPU / 12 CPU)")
    tune.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 512 GPU / 256 CPU)")
    tune.add_argument("--batch-tokens", type=int, default=None, help="tokens per optimizer step, shared by the "
                      "processes under torchrun (default 4096 GPU / 1024 CPU)")
    tune.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default 5e-5, "
                                                                         "2e-4 with --lora)")
    tune.add_argument("--lora", type=int, default=None, metavar="RANK",
                      help="train PEFT LoRA adapters of this rank on the frozen base; --output becomes a PEFT "
                           "adapter directory (needs peft: pip install 'te-llama[lora]')")
    tune.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    tune.add_argument("--lora-targets", default="all-linear",
                      help="all-linear, or HF module names such as q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                           "down_proj")
    tune.add_argument("--lora-dropout", type=float, default=0.0)
    tune.add_argument("--merge-lora", action="store_true",
                      help="also write base + adapters merged as a plain HF checkpoint in OUTPUT/merged")
    tune.add_argument("--eval-fraction", type=float, default=0.05, help="share of blocks held out for eval")
    tune.add_argument("--max-eval-blocks", type=int, default=None)
    tune.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    tune.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
    tune.add_argument("--gradient-checkpointing", action="store_true")
    tune.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer "
                      "state over the processes (FSDP2) instead of a whole copy in each (DDP), for models that do not "
                      "fit one GPU; not with --lora or --cuda-graphs")
    tune.add_argument("--cuda-graphs", action="store_true", help="replay the decoder layers as CUDA graphs (GPU, "
                      "Transformer Engine): faster steps for small models; not with --gradient-checkpointing")
    tune.add_argument("--attend-across-documents", dest="across_documents", action="store_true",
                      help="plain blocks whose tokens attend across document boundaries (what --cuda-graphs needs "
                           "under DDP); default: each document attends only to itself, trained padding-free")
    tune.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines (reported)")
    tune.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--sample-tokens", type=int, default=40, help="length of the sample reply at the end")
    tune.add_argument("--sample-prompt", default=None, help="the prompt of that reply (default: one about the "
                      "embedded news text)")
    tune.set_defaults(run=_finetune)

    evaluate = commands.add_parser("eval", help="perplexity of a checkpoint on a data file")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--max-blocks", type=int, default=None)
    evaluate.add_argument("--skip-bad-lines", action="store_true")
    evaluate.set_defaults(run=_eval)

    generate = commands.add_parser("generate", help="stream a reply (chat template when the tokenizer has one)")
    generate.add_argument("--model", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="SmolLM2-135M through te-llama: parity, round trip, generation")
    demo.add_argument("--output", default="te-llama-demo", help="directory for the checkpoint and summary.json")
    demo.add_argument("--model", default=None, help="HF Llama checkpoint (default: embedded SmolLM2-135M)")
    demo.add_argument("--eval-tokens", type=int, default=512)
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.set_defaults(run=_demo)

    convert = commands.add_parser("convert", help="HF -> te-llama -> HF with a logits parity check")
    convert.add_argument("--model", required=True, help="HF checkpoint directory (Llama, Mistral, Qwen2, Qwen3)")
    convert.add_argument("--output", required=True, help="where to write the HF checkpoint")
    convert.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the checkpoint's)")
    convert.add_argument("--device", default=None, help="cuda or cpu (default: by backend)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    convert.set_defaults(run=_convert)

    from te_llama.bench.suite import SHAPES

    bench = commands.add_parser("bench", help="te-llama vs HF, torch.compile, Liger, torchao: one table + JSON")
    from te_llama.bench import generation, packed_sft

    bench.add_argument("--generation", action="store_true",
                       help="benchmark greedy generation instead of training (its own shapes and variants)")
    bench.add_argument("--packed", action="store_true",
                       help="benchmark fine-tuning on documents of mixed lengths: HF padded and padding-free against "
                            "te-llama padding-free (its own shapes and variants)")
    bench.add_argument("--shapes", default=None, help=f"comma-separated, of: {', '.join(SHAPES)} (default A,B,C); "
                       f"with --generation: {', '.join(generation.SHAPES)} (default 1B-b1,1B-b16,1B-b64,8B-b1); "
                       f"with --packed: {', '.join(packed_sft.SHAPES)} (default 8B)")
    bench.add_argument("--variants", default=None, help="comma-separated variants (default: the suite); with "
                       f"--generation: {', '.join(generation.VARIANTS)}; with --packed: "
                       f"{', '.join(packed_sft.VARIANTS)}")
    bench.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--output", default="bench.json")
    bench.add_argument("--timeout", type=int, default=600, help="seconds allowed per variant and shape")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from te_llama.bench.suite import BenchmarkArgumentError
    from te_llama.commands.finetune import FinetuneError, OutOfMemoryAdvice
    from te_llama.commands.lora import LoraOptionError
    from te_llama.training.fsdp import FSDPError

    try:
        return args.run(args)
    except OutOfMemoryAdvice as error:
        print(f"te-llama {args.command}: out of GPU memory: {error}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except (*EXPECTED_ERRORS, BenchmarkArgumentError, FinetuneError, FSDPError, LoraOptionError) as error:
        print(f"te-llama {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"te-llama {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
