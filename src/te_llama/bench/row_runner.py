"""What the generation and padding-free suites share: one process per (variant, shape) row, the table as rows
arrive, and the JSON report written atomically (the training suite's own runner also batches shapes per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from te_llama.bench.suite import RESULT_PREFIX, environment
from te_llama.bench.variants import BenchmarkArgumentError


def check_names(what: str, names: list[str], known, kind: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BenchmarkArgumentError(f"unknown {kind} {what}: {', '.join(unknown)} ({what}s: {', '.join(known)})")


def run_row(module: str, variant: str, shape: str, extra: list[str], timeout: int,
            failure: Callable[[str], str] = lambda reason: "failed") -> dict:
    """The row ``python -m module --worker variant --shape shape *extra`` prints; ``failure(reason)`` names the
    status of a process that printed none."""
    command = [sys.executable, "-m", module, "--worker", variant, "--shape", shape, *extra]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"variant": variant, "shape": shape, "status": "failed", "reason": f"timeout after {timeout} s"}
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    reason = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"variant": variant, "shape": shape, "status": failure(reason), "reason": reason}


def run_rows(command: str, shapes: list[str], variants: list[str], row: Callable[[str, str], dict],
             add_ratios: Callable[[list[dict]], None], header: str, format_row: Callable[[dict], str],
             output: str) -> list[dict]:
    """Every (shape, variant) row in turn, printed as it arrives; then the ratios, the JSON report in ``output``
    (written to a temporary name, then renamed) and the whole table again."""
    env = environment()
    print(f"GPU: {env['gpu']}  " + "  ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    print(header)
    rows = []
    for shape in shapes:
        for variant in variants:
            rows.append(row(variant, shape))
            print(format_row(rows[-1]), flush=True)
    add_ratios(rows)
    partial = output + ".partial"
    with open(partial, "w") as handle:
        json.dump({"command": command, "environment": env, "rows": rows}, handle, indent=1)
    os.replace(partial, output)
    print("\n" + header)
    for finished in rows:
        print(format_row(finished))
    return rows
