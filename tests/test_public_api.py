"""The public API (``from te_llama import ...``) and what importing the package does and does not load."""

import subprocess
import sys

import te_llama

PUBLIC = [
    "AdamW", "AutoModelForCausalLM", "BackendUnavailableError", "CheckpointError", "CudaGraphError", "FP8Config",
    "FP8ConfigError", "FP8StateCallback", "TELlamaDecoderLayer", "TELlamaForCausalLM", "TEMistralForCausalLM",
    "TEQwen2ForCausalLM", "TEQwen3ForCausalLM", "UnsupportedConfigError", "decoder_layer_class",
    "replace_decoder_layer", "resolve_backend",
]


def test_the_public_names_are_these_and_all_resolve():
    assert sorted(te_llama.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(te_llama, name) is not None, name


def test_importing_the_package_neither_loads_transformer_engine_nor_patches_it():
    script = ("import sys, te_llama, te_llama.te_patches as p; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformer_engine')); "
              "print([n for n in p.REPLACEMENTS if p.installed(n)])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "[]"]


def test_the_package_layout_shows_the_architecture():
    from importlib import resources

    top = sorted(p.name for p in resources.files("te_llama").iterdir() if p.name.endswith(".py"))
    packages = sorted(p.name for p in resources.files("te_llama").iterdir()
                      if p.is_dir() and (p / "__init__.py").is_file())
    assert packages == ["bench", "checkpoint", "commands", "generation", "kernels", "model", "training"]
    assert len(top) <= 12, top
