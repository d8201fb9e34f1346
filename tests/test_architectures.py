"""Architecture details: JumpReLU's straight-through gradients, BatchTopK's batch budget and
inference threshold, and exports that encode raw activations exactly as training did."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import arch
from sae.arch import LossContext, SaeSpec, from_export_config
from sae.arch.jumprelu import jump_relu, step_function
from sae.io import saelens

from .test_training import WIDTH, D, _data


def test_jumprelu_threshold_gradient_lives_in_the_bandwidth_window():
    pre = jnp.array([[0.2, 0.96, 1.04, 2.0]])
    threshold = jnp.ones(4)
    grad_threshold = jax.grad(lambda t: jnp.sum(step_function(pre, t, 0.1)))(threshold)
    np.testing.assert_allclose(grad_threshold, [0.0, -10.0, -10.0, 0.0])
    grad_pre, grad_t = jax.grad(lambda p, t: jnp.sum(jump_relu(p, t, 0.1)), argnums=(0, 1))(
        pre, threshold
    )
    np.testing.assert_allclose(grad_pre, [[0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(grad_t, [0.0, -10.0, -10.0, 0.0])


def test_batchtopk_spends_k_per_token_on_average_across_the_batch():
    x = jnp.asarray(_data(128))
    sae = arch.build(SaeSpec(architecture="batchtopk", k=4), D, d_sae=WIDTH)
    params = sae.init_params(jax.random.key(0), x)
    ctx = LossContext(jnp.float32(1.0), jnp.zeros(WIDTH, bool))
    _, out = sae.loss(params, sae.init_buffers(), x, ctx)
    assert float(out["l0"]) == pytest.approx(4.0)
    assert float(out["cutoff"]) > 0
    buffers = sae.update_buffers(sae.init_buffers(), out, jnp.int32(0))
    assert float(buffers["threshold"]) == pytest.approx(float(out["cutoff"]))


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_export_with_folded_scale_encodes_raw_activations(architecture, tmp_path):
    raw = _data(64)
    scale = 0.37
    sae = arch.build(SaeSpec(architecture=architecture), D, d_sae=WIDTH)
    params = sae.init_params(jax.random.key(0), jnp.asarray(raw * scale))
    buffers = sae.init_buffers()
    if "threshold" in buffers:
        buffers = {"threshold": jnp.float32(0.5)}
    weights = {**params, **buffers}
    trained_latents = sae.encode(weights, jnp.asarray(raw * scale))
    exported = jax.tree.map(np.asarray, sae.export_weights(weights))
    cfg = {**sae.export_config(), "d_in": D, "d_sae": WIDTH}
    saelens.save(str(tmp_path), saelens.fold_input_scale(exported, scale), cfg)
    loaded, loaded_params, _ = saelens.load(str(tmp_path))
    assert type(loaded) is type(from_export_config(cfg))
    latents = loaded.encode(loaded_params, jnp.asarray(raw))
    np.testing.assert_allclose(latents, trained_latents, rtol=1e-4, atol=1e-4)
    reconstruction = loaded.decode(loaded_params, latents)
    trained_reconstruction = sae.decode(weights, trained_latents) / scale
    np.testing.assert_allclose(reconstruction, trained_reconstruction, rtol=1e-4, atol=1e-4)
