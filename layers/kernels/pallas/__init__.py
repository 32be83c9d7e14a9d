"""Pallas kernels for the hot loops (`jax.experimental.pallas`).

Each kernel is one more implementation (`layers.kernels.Impl`) of an
existing op, chosen per platform and declining with a stated reason; the
pure-JAX forms in `layers.kernels` stay the CPU path and the oracle that
every kernel is tested against (in Pallas interpret mode on CPU).
"""
