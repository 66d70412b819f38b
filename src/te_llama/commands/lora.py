"""``te-llama finetune --lora``: PEFT LoRA adapters on a frozen te-llama base, saved as a standard PEFT directory.

The adapters sit on HF's module names (:mod:`te_llama.model.adapters`), so the directory loads into plain
transformers + PEFT (``PeftModel.from_pretrained(LlamaForCausalLM..., OUTPUT)``) as into te-llama.
"""

from __future__ import annotations

from pathlib import Path

from te_llama.checkpoint.files import staging_directory


class LoraOptionError(ValueError):
    pass


def lora_settings(config):
    """The ``peft.LoraConfig`` that ``--lora``, ``--lora-alpha``, ``--lora-targets`` and ``--lora-dropout`` ask for."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise LoraOptionError(f"--lora needs PEFT, which is not installed ({error}): pip install 'te-llama[lora]'")

    from te_llama.model.adapters import ATTENTION_SITES, MLP_SITES

    targets = config.lora_targets.strip()
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
        unknown = sorted(set(targets) - set(ATTENTION_SITES + MLP_SITES))
        if unknown or not targets:
            raise LoraOptionError(
                f"--lora-targets {config.lora_targets!r}: {', '.join(unknown) or 'no name'} is not a Llama "
                f"projection; use all-linear or some of {','.join(ATTENTION_SITES + MLP_SITES)}")
    return LoraConfig(r=config.lora, lora_alpha=config.lora_alpha or 2 * config.lora, target_modules=targets,
                      lora_dropout=config.lora_dropout, task_type="CAUSAL_LM")


def add_lora(model, settings, gradient_checkpointing: bool = False):
    """``model`` wrapped by PEFT with ``settings``: the base frozen, the adapters trainable."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()  # a re-entrant checkpoint needs an input that requires grad
    return get_peft_model(model, settings)


def _counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def describe_lora(model, settings) -> str:
    trainable, total = _counts(model)
    targets = settings.target_modules if isinstance(settings.target_modules, str) else ",".join(
        sorted(settings.target_modules))
    return (f"LoRA: rank {settings.r}, alpha {settings.lora_alpha:g}, dropout {settings.lora_dropout:g} on {targets}; "
            f"{trainable:,} trainable parameters ({100 * trainable / total:.2f} % of {total:,}), the base frozen")


def lora_summary(model, settings) -> dict:
    trainable, total = _counts(model)
    targets = settings.target_modules if isinstance(settings.target_modules, str) else sorted(settings.target_modules)
    return {"rank": settings.r, "alpha": settings.lora_alpha, "dropout": settings.lora_dropout, "targets": targets,
            "trainable_parameters": trainable, "parameters": total}


def save_lora(model, out: Path, merge: bool) -> dict:
    """Write the adapter as a PEFT directory into ``out`` and, with ``merge``, base + adapters into ``out/merged``
    (a plain HF checkpoint). Each goes to a staging directory first and is renamed when complete."""
    saved = {"adapter": str(out)}
    staging = staging_directory(out / "adapter", "saving")
    model.save_pretrained(staging)
    for file in staging.iterdir():
        file.replace(out / file.name)
    staging.rmdir()
    if merge:
        merged = model.merge_and_unload()  # writes the adapters into the base weights; the PeftModel is spent
        merged.save_pretrained(out / "merged")  # te-llama's save_pretrained is atomic itself
        saved["merged"] = str(out / "merged")
    return saved
