"""mixerlab layers: sequence mixers, channel mixers, norms, positions and
kernels. Depends on nothing else in mixerlab."""

from layers import _xla_flags  # noqa: F401  (before any computation)
