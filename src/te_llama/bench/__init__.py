"""``te-llama bench``: the suite, its variants and the GPU's clock and power during the timed steps."""
