"""Adam with a warm-up / constant / decay learning-rate schedule and global-norm clipping, read
straight from the run's TrainConfig (the schedule and Adam) and each SAE's learning rate."""

from __future__ import annotations

import optax

from sae.config import TrainConfig


def learning_rate_schedule(peak: float, train: TrainConfig) -> optax.Schedule:
    """Linear ramp from 0 over `lr_warmup_steps` (Adam's early moments are noisy), `peak`,
    then a linear or cosine decay over the last `lr_decay_steps` (SAELens' default: the last
    20%) to `lr_final_fraction` of the peak."""
    warmup, decay = train.lr_warmup_steps, train.lr_decay_steps
    decay_start = max(train.steps - decay, warmup)
    pieces = [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)]
    if train.lr_decay_shape == "cosine":
        pieces.append(optax.cosine_decay_schedule(peak, max(decay, 1), train.lr_final_fraction))
    else:
        final = peak * train.lr_final_fraction
        pieces.append(optax.linear_schedule(peak, final, max(decay, 1)))
    return optax.join_schedules(pieces, [warmup, decay_start])


def make_optimizer(peak: float, train: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(peak, train)
    adam = optax.adam(schedule, b1=train.adam_beta1, b2=train.adam_beta2, eps=1e-8)
    if train.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adam)
    return adam
