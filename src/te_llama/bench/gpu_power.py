"""The GPU's SM clock and power draw while the benchmark times its steps, read with ``nvidia-smi``.

An FP8 training step can draw the GPU's whole power limit: then the GPU lowers its clock and every kernel,
compute-bound or not, runs slower than at full clock. A benchmark row that reports the clock it ran at says whether a ratio is the code's or the
chip's power state. Where ``nvidia-smi`` is missing or fails the row simply has no such fields.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile

import torch

QUERY = "clocks.sm,power.draw,power.limit"


class PowerSampler:
    """``with PowerSampler() as sampler: ...`` samples the current CUDA device every ``interval_ms`` in an
    ``nvidia-smi`` process of its own (nothing runs in this process); :meth:`summary` says what it saw."""

    def __init__(self, interval_ms: int = 50):
        self.interval_ms = interval_ms
        self._process: subprocess.Popen | None = None
        self._samples = None  # a temporary file, not a pipe: a long run must not fill it and stall the sampling
        self._output = ""

    def __enter__(self) -> PowerSampler:
        command = _command(self.interval_ms)
        if command is not None:
            self._samples = tempfile.TemporaryFile("w+")
            try:
                self._process = subprocess.Popen(command, stdout=self._samples, stderr=subprocess.DEVNULL)
            except OSError:
                self._process = None
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._samples is not None:
            self._samples.seek(0)
            self._output = self._samples.read()
            self._samples.close()

    def summary(self) -> dict | None:
        """Median and lowest SM clock (MHz), median power draw and the limit (W), sample count; ``None`` without
        samples."""
        return summarize(self._output)


def _command(interval_ms: int) -> list[str] | None:
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    try:  # nvidia-smi numbers GPUs its own way (CUDA_VISIBLE_DEVICES aside): name this one by its UUID
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except (AttributeError, RuntimeError):
        return None
    device = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    return ["nvidia-smi", "-i", device, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
            "-lms", str(interval_ms)]


def summarize(output: str) -> dict | None:
    """Summary of ``nvidia-smi --query-gpu=clocks.sm,power.draw,power.limit --format=csv,noheader,nounits``
    lines; lines that are not three numbers ("[N/A]", errors) are left out."""
    clocks, power, limits = [], [], []
    for line in output.splitlines():
        try:
            clock, draw, limit = (float(field) for field in line.split(","))
        except ValueError:
            continue
        clocks.append(clock)
        power.append(draw)
        limits.append(limit)
    if not clocks:
        return None
    return {"sm_clock_mhz": statistics.median(clocks), "sm_clock_min_mhz": min(clocks),
            "power_w": statistics.median(power), "power_limit_w": max(limits), "samples": len(clocks)}
