"""Generation beyond what HF's ``generate()`` does itself: the decode step recorded as a CUDA graph
(:mod:`te_llama.generation.decode_graphs`)."""
