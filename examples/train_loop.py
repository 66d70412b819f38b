"""A plain PyTorch training loop for a te-llama model: FP8, gradient accumulation, clipping, fused AdamW.

Runs as is (``python examples/train_loop.py --model DIR``) or under ``accelerate launch --mixed_precision bf16``
(``--multi_gpu --num_processes N``, or ``torchrun --nproc_per_node N``, for DDP with te-llama's DDP options:
gradients as views into DDP's buckets).
FP8 is te-llama's own switch (``--fp8``), not accelerate's: never launch with ``--mixed_precision fp8``.
With gradient accumulation, ``is_first_microbatch`` lets TE cast the weights to FP8 once per optimizer step.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from transformers import AutoTokenizer

from te_llama import TELlamaForCausalLM
from te_llama.commands.assets import english_text, smollm2_checkpoint
from te_llama.training.distributed import DDP_OPTIONS, ddp_options_of
from te_llama.training.fp8 import parse_fp8


def token_blocks(model_dir: str, seq: int, tokens: str | None) -> torch.Tensor:
    if tokens:  # pre-tokenized ids (benchmarks/prepare_tokens.py), for machines without the text package
        ids = torch.from_numpy(np.load(tokens).astype(np.int64))
    else:
        ids = AutoTokenizer.from_pretrained(model_dir)(english_text(), return_tensors="pt").input_ids[0]
    usable = len(ids) // seq * seq
    return ids[:usable].view(-1, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF Llama checkpoint (default: embedded SmolLM2-135M)")
    parser.add_argument("--fp8", default="off", help="auto, delayed, current, block, mxfp8 or off")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--tokens", default=None, help=".npy of token ids instead of the embedded text")
    args = parser.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulation, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(**DDP_OPTIONS)])
    model_dir = args.model or str(smollm2_checkpoint())
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
    model = TELlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, device=accelerator.device,
                                               fp8=parse_fp8(args.fp8))
    model.train()
    blocks = token_blocks(model_dir, args.seq, args.tokens)
    loader = torch.utils.data.DataLoader(blocks, batch_size=args.micro_batch, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=accelerator.device.type == "cuda")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    fp8 = accelerator.unwrap_model(model).fp8_recipe_name
    where = str(accelerator.device)
    if accelerator.num_processes > 1 and (options := ddp_options_of(model)) is not None:
        settings = ", ".join(f"{name}={value}" for name, value in options.items())
        where += f", {accelerator.num_processes} processes (DDP, {settings})"
    accelerator.print(f"training on {where} in {fp8 or dtype} for {args.steps} optimizer steps")

    step, micro = 0, 0
    while step < args.steps:
        for ids in loader:
            with accelerator.accumulate(model):
                first = micro % args.accumulation == 0
                loss = model(input_ids=ids, labels=ids, is_first_microbatch=first if fp8 else None).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if accelerator.sync_gradients:
                step += 1
                accelerator.print(f"step {step:3d}  loss {loss.item():.4f}  grad norm {float(norm):.3f}")
                if step == args.steps:
                    break


if __name__ == "__main__":
    main()
