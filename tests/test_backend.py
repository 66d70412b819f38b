"""Backend selection: automatic, forced by env or argument, never a silent fallback."""

import subprocess
import sys

import pytest

from te_llama import BackendUnavailableError, TELlamaForCausalLM, resolve_backend
from conftest import tiny_config


def test_reference_when_forced(monkeypatch):
    monkeypatch.setenv("TE_LLAMA_BACKEND", "reference")
    assert resolve_backend() == "reference"


def test_auto_without_te_is_reference(monkeypatch):
    monkeypatch.setenv("TE_LLAMA_BACKEND", "auto")
    monkeypatch.setattr("te_llama.backend.te_unavailable_reason", lambda: "transformer_engine is not installed")
    assert resolve_backend() == "reference"


def test_te_requested_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("TE_LLAMA_BACKEND", "te")
    monkeypatch.setattr("te_llama.backend.te_unavailable_reason", lambda: "no CUDA GPU is visible to PyTorch")
    with pytest.raises(BackendUnavailableError, match="TE_LLAMA_BACKEND=reference"):
        resolve_backend()
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        TELlamaForCausalLM.from_config(tiny_config())


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("TE_LLAMA_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="unknown te-llama backend 'tensorrt'"):
        resolve_backend()


def test_choice_is_logged_once_on_stderr(monkeypatch, capsys):
    import te_llama.backend as backend

    monkeypatch.setattr(backend, "_logged", set())
    resolve_backend("reference")
    resolve_backend("reference")
    lines = [line for line in capsys.readouterr().err.splitlines() if "backend" in line]
    assert lines == ["te-llama: backend reference (requested by argument)"]


def test_import_does_not_load_transformer_engine():
    code = "import sys, te_llama; te_llama.TELlamaForCausalLM; print('transformer_engine' in sys.modules)"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert imported and not any(name.split(".")[0] == "transformer_engine" for name in imported)


def test_unsupported_config_fields_are_named():
    from te_llama import UnsupportedConfigError

    for overrides, field in [(dict(hidden_act="gelu"), "hidden_act"), (dict(sliding_window=16), "sliding_window"),
                             (dict(use_qk_norm=True), "use_qk_norm"), (dict(num_key_value_heads=3), "num_key")]:
        with pytest.raises(UnsupportedConfigError, match=field):
            TELlamaForCausalLM.from_config(tiny_config(**overrides))
