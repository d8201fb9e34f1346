"""Resampling dead latents of a ReLU SAE (Anthropic, "Towards Monosemanticity", 2023).

Each dead latent is pointed at an input the SAE reconstructs badly (drawn with probability
proportional to its squared loss): the decoder row becomes that input's unit direction, the
encoder column the same direction at 0.2x the mean norm of live encoder columns, the encoder
bias zero, and Adam's moments for it are cleared so stale statistics do not push it back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sae.arch.base import Params

ENCODER_SCALE = 0.2


def reset_moments(opt_state: Any, dead: jax.Array) -> Any:
    """Zero the optimizer statistics of the dead latents' parameters."""

    def reset(path: tuple, leaf: Any) -> Any:
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        name = names[-1] if names else None
        if name == "W_enc":
            return jnp.where(dead[None, :], 0.0, leaf)
        if name in ("W_dec", "b_enc", "log_threshold"):
            mask = dead[:, None] if leaf.ndim == 2 else dead
            return jnp.where(mask, 0.0, leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(reset, opt_state)


def resample_dead(
    key: jax.Array,
    params: Params,
    opt_state: Any,
    dead: jax.Array,
    x: jax.Array,
    reconstruction: jax.Array,
) -> tuple[Params, Any]:
    squared_loss = jnp.sum((x - reconstruction) ** 2, axis=-1)
    weights = squared_loss**2
    probabilities = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    chosen = jax.random.choice(key, x.shape[0], (dead.shape[0],), p=probabilities)
    directions = x[chosen] - params["b_dec"]
    directions = directions / jnp.maximum(jnp.linalg.norm(directions, axis=1, keepdims=True), 1e-8)
    encoder_norms = jnp.linalg.norm(params["W_enc"], axis=0)
    alive = ~dead
    alive_norm = jnp.sum(jnp.where(alive, encoder_norms, 0.0)) / jnp.maximum(jnp.sum(alive), 1)
    alive_norm = jnp.where(jnp.any(alive), alive_norm, 1.0)
    new = dict(params)
    new["W_dec"] = jnp.where(dead[:, None], directions, params["W_dec"])
    new["W_enc"] = jnp.where(
        dead[None, :], directions.T * ENCODER_SCALE * alive_norm, params["W_enc"]
    )
    new["b_enc"] = jnp.where(dead, 0.0, params["b_enc"])
    return new, reset_moments(opt_state, dead)
