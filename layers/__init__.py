"""mixerlab layers: sequence mixers, channel mixers, norms, positions and
kernels. Depends on nothing else in mixerlab."""
