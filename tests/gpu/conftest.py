"""GPU tests: real Transformer Engine on a CUDA GPU. Run with ``pytest -m gpu tests/gpu``.

Numbers each test measures are collected and, when ``TE_LLAMA_REPORT`` names a file, written there as JSON.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
pytest.importorskip("transformer_engine.pytorch")

_RESULTS: list[dict] = []


@pytest.fixture(scope="session")
def record():
    def add(**row):
        _RESULTS.append(row)
        print(json.dumps(row))

    return add


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TE_LLAMA_REPORT")
    if path and _RESULTS:
        import transformer_engine
        import transformers

        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "transformers": transformers.__version__, "transformer_engine": transformer_engine.__version__}
        with open(path, "w") as handle:
            json.dump({"environment": meta, "results": _RESULTS}, handle, indent=1)
