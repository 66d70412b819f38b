"""``benchmarks/ddp_step.py`` (steps under DDP) on the CPU: two gloo processes run the tiny shape and write one row."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from te_llama.bench.suite import SHAPES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ddp_step.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def run(*args, processes=2):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*launcher, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=240)


def test_two_processes_write_one_row_for_the_step(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = run("--variant", "te_bf16", "--shape", "tiny", "--steps", "3", "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1  # the first process writes; the step lasts as long as the slower process
    row = rows[0]
    assert row["processes"] == 2 and row["variant"] == "te_bf16" and row["ms_per_step"] > 0
    assert row["tokens_per_s"] == 2 * 2 * 64 / row["ms_per_step"] * 1000  # both processes' tokens (tiny: 2 x 64)
    assert row["gpu"] == "cpu" and row["versions"]["torch"]
    # random tokens barely learnt in 4 steps: each process's loss is about ln(vocab), and so is their average
    assert abs(row["final_loss"] - math.log(SHAPES["tiny"].config["vocab_size"])) < 0.5
    assert row["ddp_options"] == {"gradient_as_bucket_view": True}  # te-llama's DDP options


def test_gradients_as_bucket_views_train_as_torchs_default_ddp(tmp_path):
    """te-llama's DDP option (gradients as views into the all-reduce buckets) changes where gradients live, not
    their values: the same steps end at the same loss, bit for bit."""
    rows = []
    for options in ([], ["--torch-ddp-defaults"]):
        out = tmp_path / f"rows{len(rows)}.jsonl"
        result = run("--variant", "te_bf16", "--shape", "tiny", "--steps", "3", "--warmup", "2", "--out", str(out),
                     *options)
        assert result.returncode == 0, result.stderr[-2000:]
        rows.append(json.loads(out.read_text()))
    assert [row["ddp_options"] for row in rows] == [{"gradient_as_bucket_view": True}, {}]
    assert rows[0]["final_loss"] == rows[1]["final_loss"]


def test_a_variant_that_needs_a_gpu_is_refused_by_name(tmp_path):
    result = run("--variant", "te_fp8_delayed_graphs", "--shape", "tiny", "--out", str(tmp_path / "x.jsonl"),
                 processes=1)
    assert result.returncode != 0 and "te_fp8_delayed_graphs on shape tiny: needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()
