"""The model: the decoder layer on Transformer Engine (or the reference layer), the stack that runs it, the
causal-LM class, RoPE, masks and the LM-head loss."""
