"""``te-llama`` command line: a thin map from subcommands to functions that are also callable from Python."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from te_llama.assets import AssetError
from te_llama.backend import BackendUnavailableError
from te_llama.checkpoint_io import CheckpointError
from te_llama.fp8 import FP8ConfigError
from te_llama.layer import UnsupportedConfigError

EXPECTED_ERRORS = (AssetError, BackendUnavailableError, CheckpointError, FP8ConfigError, UnsupportedConfigError,
                   FileExistsError, ValueError)


def _demo(args) -> int:
    from te_llama.demo import run_demo

    summary = run_demo(output=args.output, eval_tokens=args.eval_tokens, max_new_tokens=args.max_new_tokens,
                       model=args.model)
    ok = summary["round_trip_bit_identical"] and summary["parity"]["relative_error"] < 5e-2
    return 0 if ok else 1


def _convert(args) -> int:
    from te_llama.convert import convert_checkpoint

    report = convert_checkpoint(args.model, args.output, dtype=args.dtype, device=args.device)
    print(json.dumps(report.as_dict(), indent=2))
    print(f"saved HF checkpoint to {args.output}")
    return 0


def _bench(args) -> int:
    from te_llama.benchmark import bench

    rows = bench(shapes=args.shapes, variants=args.variants, steps=args.steps, warmup=args.warmup, output=args.output,
                 timeout=args.timeout)
    return 0 if all(row["status"] in ("ok", "skipped") for row in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="te-llama", description="Hugging Face Llama on Transformer Engine, in FP8")
    parser.add_argument("-v", "--verbose", action="store_true", help="log te-llama's decisions (backend, FP8)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="SmolLM2-135M through te-llama: parity, round trip, generation")
    demo.add_argument("--output", default="te-llama-demo", help="directory for the checkpoint and summary.json")
    demo.add_argument("--model", default=None, help="HF Llama checkpoint (default: embedded SmolLM2-135M)")
    demo.add_argument("--eval-tokens", type=int, default=512)
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.set_defaults(run=_demo)

    convert = commands.add_parser("convert", help="HF -> te-llama -> HF with a logits parity check")
    convert.add_argument("--model", required=True, help="HF Llama checkpoint directory")
    convert.add_argument("--output", required=True, help="where to write the HF checkpoint")
    convert.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the checkpoint's)")
    convert.add_argument("--device", default=None, help="cuda or cpu (default: by backend)")
    convert.set_defaults(run=_convert)

    from te_llama.benchmark import SHAPES, VARIANTS

    bench = commands.add_parser("bench", help="te-llama vs HF, torch.compile, Liger, torchao: one table + JSON")
    bench.add_argument("--shapes", default="A,B,C", help=f"comma-separated, of: {', '.join(SHAPES)}")
    bench.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    bench.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--output", default="bench.json")
    bench.add_argument("--timeout", type=int, default=600, help="seconds allowed per variant process")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except EXPECTED_ERRORS as error:
        print(f"te-llama {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
