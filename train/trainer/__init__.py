"""The training loop's parts: train state, sharding, optimizer, step, eval,
checkpoints, metrics and the run directory. The entry point is train.loop."""
