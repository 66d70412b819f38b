"""HF checkpoint -> te-llama -> HF checkpoint, with a logits parity check against plain transformers."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from te_llama.checkpoint.files import CheckpointError
from te_llama.model.auto import AutoModelForCausalLM
from te_llama.model.modeling import TECausalLM, resolve_dtype


@dataclass(frozen=True)
class ParityReport:
    tokens: int
    max_abs_logit_diff: float
    relative_error: float
    dtype: str
    backend: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def logits_parity(te_model: TECausalLM, hf_model: transformers.PreTrainedModel, ids: torch.Tensor) -> ParityReport:
    """Compare both models' logits on ``ids`` (shape ``[batch, seq]``)."""
    expected = hf_model(ids.to(hf_model.device)).logits.double()
    actual = te_model(ids.to(te_model.device)).logits.double().to(expected.device)
    return ParityReport(
        tokens=ids.numel(),
        max_abs_logit_diff=(actual - expected).abs().max().item(),
        relative_error=((actual - expected).norm() / expected.norm()).item(),
        dtype=str(te_model.dtype).removeprefix("torch."),
        backend=te_model.te_backend,
    )


def convert_checkpoint(model: str | os.PathLike, output: str | os.PathLike, dtype: str = "auto",
                       device: str | None = None, check_tokens: int = 256, overwrite: bool = False) -> ParityReport:
    """Load ``model`` into te-llama, check logits against transformers, save an HF checkpoint to ``output`` (which
    must not exist, unless ``overwrite``; never ``model`` itself)."""
    check_output(Path(model), Path(output), overwrite)
    te_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device=device)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        model, dtype=resolve_dtype(dtype, te_model.config)).to(te_model.device)
    hf_model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, te_model.config.vocab_size, (1, check_tokens), generator=generator)
    report = logits_parity(te_model, hf_model, ids)
    del hf_model
    te_model.save_pretrained(output)
    copy_tokenizer(Path(model), Path(output))
    return report


def check_output(model: Path, output: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an ``output`` that is ``model`` or, without ``overwrite``, exists."""
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise CheckpointError(f"--output {output} is the --model directory; write the converted checkpoint elsewhere")
    if output.exists() and not overwrite:
        raise CheckpointError(f"--output {output} exists; pass --overwrite to replace it, or choose another directory")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy the tokenizer files a checkpoint directory has (what AutoTokenizer reads) to another."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
