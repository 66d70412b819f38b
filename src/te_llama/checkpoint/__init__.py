"""Checkpoint conversion: the HF <-> TE name table, reading and writing HF checkpoint files, streaming into TE's
parameters."""
