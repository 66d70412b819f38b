"""te-llama's Triton kernels (AdamW step, LM-head loss, SwiGLU's FP8 backward) and their adapters; each is imported
only when it runs."""
