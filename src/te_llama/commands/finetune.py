"""``te-llama finetune``: fine-tune a Llama, Mistral, Qwen2 or Qwen3 checkpoint with te-llama on the HF Trainer, FP8 on
a GPU.

With no ``--model``/``--data`` it fine-tunes the embedded SmolLM2-135M-Instruct on the embedded English text
(the news corpus; on a GPU also the Wikipedia excerpt). It reports perplexity on a held-out split before and
after, logs loss, learning rate and tokens/s (stdout and TensorBoard when installed), checkpoints every N steps
(resumable with ``--resume``: same data order, FP8 scaling state restored), stops cleanly on Ctrl-C/SIGTERM
with a checkpoint, and leaves an HF checkpoint, a loss-curve PNG, a sample reply and ``summary.json`` in
``--output``. With ``--lora RANK`` it trains PEFT LoRA adapters on the frozen base instead (:mod:`te_llama.commands.lora`)
and ``--output`` is a standard PEFT adapter directory, with the merged HF checkpoint in ``merged/`` on
``--merge-lora``. Under ``torchrun --nproc_per_node N`` it trains on N GPUs with DDP
(:mod:`te_llama.training.distributed`), or with ``--fsdp`` sharded over them with FSDP2 (:mod:`te_llama.training.fsdp`):
``--batch-tokens`` stays the tokens of one optimizer step, shared by the processes, and the first process prints
and writes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from te_llama.training.adamw import AdamW
from te_llama.training.adamw import describe as describe_optimizer
from te_llama.commands.assets import english_text, smollm2_checkpoint, wiki_articles
from te_llama.backend import resolve_backend, working_dtype
from te_llama.checkpoint.files import CheckpointError, weight_files
from te_llama.commands.data import Example, read_examples, split_blocks, tokenize_and_pack
from te_llama.training.distributed import ddp_options_of, start_processes, use_ddp_options, wait_for_everyone
from te_llama.commands.evaluate import perplexity
from te_llama.training.fp8 import describe, parse_fp8
from te_llama.training.fsdp import default_mp_policy, reshard, shard_model
from te_llama.commands.generate import generate_text
from te_llama.commands.lora import add_lora, describe_lora, lora_settings, lora_summary, save_lora
from te_llama.model.auto import AutoModelForCausalLM
from te_llama.model.modeling import read_config
from te_llama.training.fp8_state import (
    CheckpointCompleteCallback,
    FP8StateCallback,
    GracefulStopCallback,
    LogExtrasCallback,
    last_complete_checkpoint,
)


SAMPLE_PROMPT = "Write one sentence about a bushfire near Sydney."


class FinetuneError(ValueError):
    """A fine-tuning request that cannot run as given (output directory, options)."""


class OutOfMemoryAdvice(RuntimeError):
    """CUDA ran out of memory; the message says what to change."""


@dataclass
class FinetuneConfig:
    model: str | None = None  # HF checkpoint (Llama, Mistral, Qwen2, Qwen3); None: embedded SmolLM2-135M-Instruct
    data: str | None = None  # .txt, .jsonl or datasets directory; None: embedded English text
    output: str = "te-llama-finetune"
    fp8: str = "auto"  # auto: FP8 on a GPU with TE, otherwise off (said so); or delayed/current/block/mxfp8/off
    fp8_backward_accumulation: str = "split"  # or "fast": opt-in, faster backward GEMMs (te_llama.training.fp8.FP8Config)
    max_steps: int | None = None  # default: 300 on a GPU, 12 on a CPU
    seq_len: int | None = None  # default: 512 on a GPU, 256 on a CPU
    batch_tokens: int | None = None  # tokens per optimizer step (all processes); default 4096 on a GPU, 1024 on a CPU
    learning_rate: float | None = None  # default: 5e-5, or 2e-4 with --lora
    lora: int | None = None  # LoRA rank: train PEFT LoRA adapters on the frozen base weights instead of all weights
    lora_alpha: float | None = None  # LoRA scaling numerator; default 2 x rank
    lora_targets: str = "all-linear"  # HF module names, comma-separated (q_proj,v_proj,...), or all-linear
    lora_dropout: float = 0.0
    merge_lora: bool = False  # also write base + adapters merged, as a plain HF checkpoint in OUTPUT/merged
    eval_fraction: float = 0.05
    max_eval_blocks: int | None = None  # default: 32 on a GPU, 6 on a CPU
    eval_every: int | None = None
    save_every: int | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP
    cuda_graphs: bool = False  # replay the decoder layers as CUDA graphs (GPU; under DDP needs across_documents)
    across_documents: bool = False  # plain blocks whose tokens attend across document boundaries (as CUDA graphs
    # need); by default each document attends only to itself, trained padding-free
    skip_bad_lines: bool = False
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    sample_tokens: int = 40  # tokens of the sample reply generated at the end
    sample_prompt: str = SAMPLE_PROMPT  # what the sample reply answers (the default suits the embedded news text)


def _defaults(config: FinetuneConfig, on_gpu: bool, processes: int = 1) -> FinetuneConfig:
    pick = (lambda gpu, cpu: gpu) if on_gpu else (lambda gpu, cpu: cpu)
    config.max_steps = config.max_steps or pick(300, 12)
    config.seq_len = config.seq_len or pick(512, 256)
    config.batch_tokens = config.batch_tokens or pick(4096, 1024)
    config.max_eval_blocks = config.max_eval_blocks or pick(32, 6)
    config.eval_every = config.eval_every or max(1, min(100, config.max_steps // 3))
    config.save_every = config.save_every or max(config.eval_every, config.max_steps // 2)
    config.learning_rate = config.learning_rate or (2e-4 if config.lora else 5e-5)
    config.sample_prompt = config.sample_prompt or SAMPLE_PROMPT
    if config.lora is not None and config.lora < 1:
        raise FinetuneError(f"--lora {config.lora}: the LoRA rank must be a positive integer")
    if config.merge_lora and not config.lora:
        raise FinetuneError("--merge-lora merges LoRA adapters; pass --lora RANK too")
    if config.lora and config.cuda_graphs:
        raise FinetuneError("--cuda-graphs cannot record LoRA adapters yet; drop one of --lora and --cuda-graphs")
    if config.cuda_graphs and not config.across_documents and processes > 1:
        raise FinetuneError("--cuda-graphs under DDP records plain blocks, but by default each document attends only "
                            "to itself (packed blocks, which graphs serve on one GPU only); add "
                            "--attend-across-documents for plain blocks, or drop --cuda-graphs")
    if config.fsdp and config.lora:
        raise FinetuneError("--fsdp cannot shard a model carrying LoRA adapters; LoRA trains few parameters, so "
                            "drop --fsdp (DDP) for --lora")
    if config.fsdp and config.cuda_graphs:
        raise FinetuneError("--cuda-graphs cannot be combined with --fsdp: FSDP gathers the weights into new memory "
                            "every step, which recorded graphs cannot follow; drop one of them")
    if config.fsdp and processes < 2:
        raise FinetuneError("--fsdp shards the model over several processes: launch with torchrun --nproc_per_node N "
                            "-m te_llama finetune --fsdp ... (N >= 2); on one GPU, drop --fsdp")
    if config.lora:
        lora_settings(config)  # checks --lora-targets before anything is written
    if config.batch_tokens < config.seq_len:
        raise FinetuneError(f"--batch-tokens {config.batch_tokens} is smaller than --seq-len {config.seq_len}")
    blocks = config.batch_tokens // config.seq_len
    if blocks % processes:
        raise FinetuneError(
            f"--batch-tokens {config.batch_tokens} makes {blocks} blocks of --seq-len {config.seq_len} a step, which "
            f"{processes} processes cannot share evenly; use a multiple of {config.seq_len * processes} tokens")
    return config


def _check_output(out: Path, config: FinetuneConfig) -> None:
    """Refuse an ``--output`` that is a file, or a used directory without ``--resume``/``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (config.resume or config.overwrite):
        raise FinetuneError(f"--output {out} already exists; pass --overwrite to replace it or --resume to "
                            "continue its run")


def _prepare_output(out: Path, config: FinetuneConfig) -> None:
    """Empty ``--output`` for ``--overwrite`` and create it; :func:`_check_output` has accepted it."""
    if out.is_dir() and any(out.iterdir()) and not config.resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _load_examples(config: FinetuneConfig, on_gpu: bool) -> tuple[list[Example], str, int]:
    if config.data is None:  # the CPU default stays small enough for a 2-core machine
        examples = [Example(text=line) for line in english_text().splitlines() if line.strip()]
        if not on_gpu:
            return examples, "embedded English news text (gensim's Lee corpus)", 0
        examples += [Example(text=article) for article in wiki_articles()]
        return examples, "embedded English text (gensim's Lee news corpus and Wikipedia excerpt)", 0
    examples, skipped = read_examples(config.data, config.skip_bad_lines)
    return examples, str(config.data), skipped


def _plot_losses(history: list[dict], path: Path, eval_loss_before: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(row["step"], row["loss"]) for row in history if "loss" in row]
    evals = [(0, eval_loss_before)] + [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _training_arguments(config: FinetuneConfig, out: Path, on_gpu: bool, batch_size: int) -> TrainingArguments:
    report_to = ["tensorboard"] if _tensorboard_available() else []  # logs under output_dir/runs
    # --fsdp: the model arrives sharded (shard_model), which accelerate's FSDP2 keeps as it is; the options make the
    # Trainer run it without DDP and keep resumable checkpoints as DCP shards (each process writes its own).
    fsdp = dict(fsdp=True, fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}) if config.fsdp else {}
    return TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=config.max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=config.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=config.max_steps // 20, weight_decay=0.0, max_grad_norm=1.0,  # none for short runs
        logging_steps=max(1, min(10, config.max_steps // 10)), eval_strategy="steps", eval_steps=config.eval_every,
        save_strategy="steps", save_steps=config.save_every, save_total_limit=2, seed=config.seed,
        data_seed=config.seed, bf16=on_gpu, use_cpu=not on_gpu, report_to=report_to,
        include_num_input_tokens_seen="non_padding",  # tokens/s counts real tokens, not padding
        remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every parameter has a gradient: no search of the graph each step
        optim="adamw_torch",  # on a GPU the Trainer gets te-llama's AdamW instead (_optimizer)
        **fsdp,
    )


def _optimizer(args: TrainingArguments, on_gpu: bool) -> tuple[type, dict] | None:
    """te-llama's AdamW on a GPU (:mod:`te_llama.training.adamw`; the Trainer still makes the parameter groups and
    the schedule); the Trainer's own choice (``args.optim``) on the CPU."""
    if not on_gpu:
        return None
    return AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fsdp_summary(model, policy) -> dict | None:
    """How ``--fsdp`` sharded the model, for ``summary.json`` (``None`` without it)."""
    if policy is None:
        return None
    return {"parameters": _dtype_name(next(model.parameters()).dtype), "compute": _dtype_name(policy.param_dtype),
            "gradient_reduction": _dtype_name(policy.reduce_dtype)}


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def finetune(config: FinetuneConfig) -> dict:
    """Run a fine-tuning job; returns the summary (also written to ``output/summary.json``)."""
    started = time.time()
    out = Path(config.output)
    backend = resolve_backend()
    on_gpu = backend == "te"
    processes = start_processes(on_gpu)  # before anything touches CUDA: each process on its own GPU
    main, say = processes.is_main_process, processes.print
    config = _defaults(config, on_gpu, processes.num_processes)
    if config.cuda_graphs and not on_gpu:
        raise FinetuneError("--cuda-graphs needs a CUDA GPU with Transformer Engine (this run would use the "
                            "reference layer on the CPU); drop --cuda-graphs")
    if config.cuda_graphs and config.gradient_checkpointing:
        raise FinetuneError("--gradient-checkpointing and --cuda-graphs cannot be combined: a recorded graph cannot "
                            "recompute its forward during the backward pass; pick one")
    fp8 = parse_fp8(None if (config.fp8 == "auto" and not on_gpu) else config.fp8, config.fp8_backward_accumulation)
    model_dir = Path(config.model) if config.model else smollm2_checkpoint()
    if not model_dir.is_dir():
        raise CheckpointError(f"--model {model_dir}: not a directory (a local Hugging Face checkpoint is needed)")
    read_config(model_dir), weight_files(model_dir)  # fail before touching --output
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json) to tokenize "
                              "the data with")
    examples, data_name, skipped = _load_examples(config, on_gpu)
    _check_output(out, config)  # every process, before the first one changes anything
    wait_for_everyone()
    if main:
        _prepare_output(out, config)
    wait_for_everyone()

    dtype = working_dtype(backend)
    # FSDP2 keeps FP32 master weights in the shards and computes in the working dtype (fsdp.default_mp_policy)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if config.fsdp else dtype, fp8=fp8,
                                                device=processes.device)
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    if config.cuda_graphs:
        base.enable_cuda_graphs()
    fsdp_policy = default_mp_policy(backend) if config.fsdp else None
    if config.fsdp:
        shard_model(base, mp_policy=fsdp_policy)
    if config.lora:
        transformers.set_seed(config.seed)  # PEFT draws the adapters' initial A now, before the Trainer seeds
        model = add_lora(base, lora_settings(config), config.gradient_checkpointing)
    else:
        model = base
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = tokenize_and_pack(examples, tokenizer, config.seq_len, config.across_documents)
    train_blocks, eval_blocks = split_blocks(blocks, config.eval_fraction, config.seed)
    eval_blocks = eval_blocks[: config.max_eval_blocks]
    blocks_per_step = config.batch_tokens // config.seq_len
    batch_size = blocks_per_step // processes.num_processes  # per process
    precision = describe(base.fp8_config) if base.fp8_config else str(dtype).removeprefix("torch.")
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    if processes.num_processes > 1:
        device = f"{processes.num_processes} x {device} ({'FSDP2' if config.fsdp else 'DDP'})"
    say(f"te-llama finetune: {model_dir.name} on {device}, backend {backend}, precision {precision}"
        + ("" if on_gpu else " (no GPU with Transformer Engine: reference layer, FP8 off)"))
    say(f"data: {data_name}: {len(examples)} documents" + (f" ({skipped} bad lines skipped)" if skipped else "")
        + f", {len(train_blocks)} training and {len(eval_blocks)} eval blocks of {config.seq_len} tokens; "
        f"{config.max_steps} steps of {blocks_per_step} x {config.seq_len} tokens"
        + (f", {batch_size} x {config.seq_len} per process" if processes.num_processes > 1 else ""))
    board = f"{out / 'checkpoints' / 'runs'})" if _tensorboard_available() else "not installed, pip install tensorboard)"
    if config.lora:
        say(describe_lora(model, lora_settings(config)))
    if config.fsdp:
        sharding = _fsdp_summary(base, fsdp_policy)
        say(f"FSDP2: weights, gradients and optimizer state sharded over {processes.num_processes} processes; "
            f"{sharding['parameters']} master weights, compute in {sharding['compute']}, gradients reduced in "
            f"{sharding['gradient_reduction']}")
    say(f"output: {out} (checkpoints every {config.save_every} steps; TensorBoard: {board}")

    ppl_before = perplexity(model, eval_blocks, batch_size, progress=main)  # each process, the same blocks
    if config.fsdp:
        reshard(model)  # the Trainer builds its optimizer from model.parameters(), which must be the shards
    say(f"eval perplexity before: {ppl_before:.3f}")
    stopper = GracefulStopCallback()
    args = _training_arguments(config, out, on_gpu, batch_size)
    if on_gpu and processes.num_processes == 1 and torch.cuda.device_count() > 1:
        _ = args.device  # sets up the devices, which counts every visible GPU; then one, as HF's Trainer does
        args._n_gpu = 1  # for model-parallel models: no nn.DataParallel over the others (te-llama refuses it)
        say(f"{torch.cuda.device_count()} GPUs visible, training on one: to train on all of them run "
            f"torchrun --nproc_per_node {torch.cuda.device_count()} -m te_llama finetune ...")
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=_optimizer(args, on_gpu),
                      train_dataset=train_blocks, eval_dataset=eval_blocks, data_collator=default_data_collator,
                      callbacks=[FP8StateCallback(), CheckpointCompleteCallback(), stopper])
    if config.fsdp and not trainer.is_fsdp_enabled:
        raise FinetuneError("--fsdp: accelerate did not turn on FSDP for this run (it runs FSDP on GPU process "
                            "groups only, and would wrap the sharded model in DDP); drop --fsdp to train with DDP")
    use_ddp_options(trainer)  # gradients as views into DDP's buckets, one copy a step (distributed.DDP_OPTIONS)
    trainer.callback_handler.callbacks.insert(0, LogExtrasCallback())  # before the printer sees the logs
    resume_from = last_complete_checkpoint(out / "checkpoints") if config.resume else None
    if config.resume and resume_from is None:
        say(f"--resume: no complete checkpoint under {out / 'checkpoints'}; starting from step 0")
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError as error:
        raise OutOfMemoryAdvice(
            f"the GPU ran out of memory ({str(error).splitlines()[0]}). Try a smaller --batch-tokens (now "
            f"{config.batch_tokens}) or --seq-len (now {config.seq_len}), or --gradient-checkpointing."
        ) from error

    summary = {
        "status": "interrupted" if stopper.stopped else "completed",
        "model": str(model_dir), "data": data_name, "output": str(out), "backend": backend, "device": device,
        "processes": processes.num_processes, "ddp": ddp_options_of(trainer.model_wrapped),
        "fsdp": _fsdp_summary(base, fsdp_policy),
        "precision": precision, "fp8_recipe": base.fp8_recipe_name, "steps": trainer.state.global_step,
        "cuda_graph_replays": base.cuda_graph_replays(), "fp8_weight_reuses": base.fp8_weight_reuses(),
        "lora": lora_summary(model, lora_settings(config)) if config.lora else None,
        "optimizer": describe_optimizer(trainer.optimizer),
        "resumed_from": str(resume_from) if resume_from else None,
        "tokens": int(trainer.state.num_input_tokens_seen), "train_seconds": round(result.metrics["train_runtime"], 1),
        "tokens_per_s": round(trainer.state.num_input_tokens_seen / max(result.metrics["train_runtime"], 1e-9), 1),
        "eval_perplexity_before": ppl_before, "config": asdict(config),
    }
    if on_gpu:  # this process's peak, the first process's in summary.json
        summary["peak_gpu_memory_gib"] = {"allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                          "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    if stopper.stopped:
        checkpoint = last_complete_checkpoint(out / "checkpoints")
        say(f"stopped at step {trainer.state.global_step}; checkpoint {checkpoint}; continue with --resume")
    else:
        summary["eval_perplexity_after"] = perplexity(model, eval_blocks, batch_size, progress=main)
        if main:
            print(f"eval perplexity after: {summary['eval_perplexity_after']:.3f} (before {ppl_before:.3f})")
            print(f"sample, prompt: {config.sample_prompt}\nreply: ", end="", flush=True)
        if main or config.fsdp:  # a sharded model's forwards need every process; the first one prints and writes
            text, _ = generate_text(model.eval(), tokenizer, config.sample_prompt,
                                    max_new_tokens=config.sample_tokens, stream=main)
            summary["sample"] = {"prompt": config.sample_prompt, "reply": text}
            if config.lora:
                summary["lora"].update(save_lora(model, out, merge=config.merge_lora))
                print(f"saved the LoRA adapter (PEFT) to {out}"
                      + (f" and the merged HF checkpoint to {out / 'merged'}" if config.merge_lora else ""))
            else:
                model.save_pretrained(out)  # sharded: gathered in every process, written by the first
                say(f"saved HF checkpoint to {out}")
            if main:
                tokenizer.save_pretrained(out)
                if config.merge_lora:
                    tokenizer.save_pretrained(out / "merged")
    summary["seconds"] = round(time.time() - started, 1)
    summary["log_history"] = trainer.state.log_history
    if main:
        _plot_losses(trainer.state.log_history, out / "loss_curve.png", math.log(ppl_before))
        partial = out / "summary.json.partial"
        partial.write_text(json.dumps(summary, indent=2, default=str))
        partial.replace(out / "summary.json")
        print(f"summary: {out / 'summary.json'}; loss curve: {out / 'loss_curve.png'}")
    wait_for_everyone()
    return summary


def eval_perplexity(model: str, data: str, seq_len: int = 512, batch_size: int = 4, skip_bad_lines: bool = False,
                    max_blocks: int | None = None) -> dict:
    """``te-llama eval``: perplexity of a checkpoint on a data file (all of it, or ``max_blocks`` blocks)."""
    examples, skipped = read_examples(data, skip_bad_lines)
    backend = resolve_backend()
    te_model = AutoModelForCausalLM.from_pretrained(model, dtype=working_dtype(backend))
    tokenizer = AutoTokenizer.from_pretrained(model)
    blocks = tokenize_and_pack(examples, tokenizer, seq_len)[:max_blocks]
    value = perplexity(te_model, blocks, batch_size)
    return {"model": str(model), "data": str(data), "blocks": len(blocks), "seq_len": seq_len,
            "skipped_lines": skipped, "perplexity": value, "backend": backend, "nll": math.log(value)}
