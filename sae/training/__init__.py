"""Training: the jitted sharded step, the loop with checkpoints, resume, SIGTERM and warm start,
the optimizer, dead-latent resampling, and export of the trained SAEs."""
