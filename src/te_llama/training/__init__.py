"""Training glue: FP8 recipes and their state in checkpoints, CUDA graphs, the FP8 weight cache, AdamW and several
processes."""
