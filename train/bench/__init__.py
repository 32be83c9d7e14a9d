"""Benchmarks: mixer cost against length (mixers), MoE layers against the
number of experts (moe) and the trainer's overhead (overhead)."""
