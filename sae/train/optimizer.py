"""Adam with a warm-up / constant / decay learning-rate schedule and global-norm clipping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import optax


@dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float
    total_steps: int
    # Linear ramp from 0 over the first steps: Adam's early moments are noisy.
    warmup_steps: int = 0
    # Decay over the last steps (SAELens' default is the last 20%): 0 keeps it constant.
    decay_steps: int = 0
    decay_shape: Literal["linear", "cosine"] = "linear"
    # Learning rate at the end of the decay, as a fraction of the peak.
    final_fraction: float = 0.0
    # Global-norm gradient clipping; 0 turns it off.
    clip_norm: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
    peak, final = settings.learning_rate, settings.learning_rate * settings.final_fraction
    decay_start = max(settings.total_steps - settings.decay_steps, settings.warmup_steps)
    pieces = [optax.linear_schedule(0.0, peak, settings.warmup_steps)]
    pieces.append(optax.constant_schedule(peak))
    if settings.decay_shape == "cosine":
        steps = max(settings.decay_steps, 1)
        pieces.append(optax.cosine_decay_schedule(peak, steps, alpha=settings.final_fraction))
    else:
        pieces.append(optax.linear_schedule(peak, final, max(settings.decay_steps, 1)))
    return optax.join_schedules(pieces, [settings.warmup_steps, decay_start])


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    adam = optax.adam(
        learning_rate_schedule(settings), b1=settings.beta1, b2=settings.beta2, eps=1e-8
    )
    if settings.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(settings.clip_norm), adam)
    return adam
