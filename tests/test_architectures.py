"""Architecture details: JumpReLU's straight-through gradients, BatchTopK's batch budget and
inference threshold, and exports that encode raw activations exactly as training did."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import arch
from sae.arch import LossContext, SaeSpec, from_export_config
from sae.arch.common import pre_activations
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


def _loss(sae, x, dead=None):
    params = sae.init_params(jax.random.key(0), x)
    dead = jnp.zeros(WIDTH, bool) if dead is None else dead
    return params, sae.loss(params, sae.init_buffers(), x, LossContext(jnp.float32(1.0), dead))


def test_matryoshka_loss_adds_each_prefix_reconstruction_error():
    x = jnp.asarray(_data(128))
    spec = SaeSpec(architecture="matryoshka_batchtopk", k=4, matryoshka_widths=(8, 24, WIDTH))
    sae = arch.build(spec, D, d_sae=WIDTH)
    params, (loss, out) = _loss(sae, x)
    # BatchTopK's selection over all latents, then each prefix decoded on its own.
    latents = np.asarray(sae.select(pre_activations(params, x, "float32"))[0])
    errors = []
    for width in (8, 24, WIDTH):
        reconstruction = latents[:, :width] @ np.asarray(params["W_dec"])[:width] + params["b_dec"]
        errors.append(np.mean(np.sum((reconstruction - np.asarray(x)) ** 2, axis=-1)))
    np.testing.assert_allclose(float(loss), sum(errors), rtol=1e-4)  # no dead latents: no AuxK
    np.testing.assert_allclose(float(out["parts"]["inner_mse_8"]), errors[0], rtol=1e-4)
    np.testing.assert_allclose(float(out["parts"]["mse"]), errors[-1], rtol=1e-4)
    assert float(out["l0"]) == pytest.approx(4.0)


def test_matryoshka_aux_loss_is_per_level():
    """Dead latents only in the last level: the per-level AuxK reconstructs what the whole
    SAE misses there, so it equals the plain AuxK; dead latents in the first level aim at the
    first prefix's larger residual instead."""
    x = jnp.asarray(_data(128))

    def auxk(dead_latents: slice, per_level: bool) -> float:
        spec = SaeSpec(
            architecture="matryoshka_batchtopk",
            k=4,
            matryoshka_widths=(16, WIDTH),
            use_matryoshka_aux_loss=per_level,
            k_aux=8,
        )
        dead = jnp.zeros(WIDTH, bool).at[dead_latents].set(True)
        _, (_, out) = _loss(arch.build(spec, D, d_sae=WIDTH), x, dead)
        return float(out["parts"]["auxk"])

    last_level = slice(40, WIDTH)
    assert auxk(last_level, True) == pytest.approx(auxk(last_level, False), rel=1e-5)
    assert auxk(last_level, True) > 0
    first_level = slice(0, 16)
    assert auxk(first_level, True) != pytest.approx(auxk(first_level, False), rel=1e-3)


def _jumprelu(mode: str, **options):
    spec = SaeSpec(
        architecture="jumprelu",
        jumprelu_sparsity_loss_mode=mode,
        jumprelu_init_threshold=0.3,
        sparsity_coefficient=1.0,
        **options,
    )
    return arch.build(spec, D, d_sae=WIDTH)


def test_jumprelu_sparsity_losses_follow_saelens_definitions():
    x = jnp.asarray(_data(128))
    target = 5.0
    losses = {}
    for mode, options in {
        "step": {},
        "quadratic": {"target_l0": target},
        "tanh": {"jumprelu_tanh_scale": 2.0},
    }.items():
        sae = _jumprelu(mode, **options)
        params, (loss, out) = _loss(sae, x)
        latents = np.asarray(sae.encode(params, x))
        l0 = np.sum(latents != 0, axis=-1)
        losses[mode] = float(out["parts"][f"{mode}_penalty"])
        expected = {
            "step": np.mean(l0),
            "quadratic": np.mean(2.0 / target * (l0 - target) ** 2),
            "tanh": np.mean(np.sum(np.tanh(2.0 * latents), axis=-1)),  # unit decoder rows
        }[mode]
        np.testing.assert_allclose(losses[mode], expected, rtol=1e-4)
        np.testing.assert_allclose(float(loss), float(out["parts"]["mse"]) + expected, rtol=1e-4)


@pytest.mark.parametrize("target", [1.0, 60.0])
def test_quadratic_loss_pulls_thresholds_toward_the_target_l0(target):
    """Above the target, the thresholds' gradient raises them (fewer latents); below, it
    lowers them: the pull works from both sides, unlike the step loss."""
    x = jnp.asarray(_data(128))
    sae = _jumprelu("quadratic", target_l0=target)
    params = sae.init_params(jax.random.key(0), x)
    ctx = LossContext(jnp.float32(1.0), jnp.zeros(WIDTH, bool))
    l0 = float(sae.loss(params, {}, x, ctx)[1]["l0"])
    assert 1.0 < l0 < 60.0

    def penalty(log_threshold):
        out = sae.loss({**params, "log_threshold": log_threshold}, {}, x, ctx)[1]
        return out["parts"]["quadratic_penalty"]

    grad = np.asarray(jax.grad(penalty)(params["log_threshold"]))
    assert np.any(grad != 0)
    # Gradient descent moves log thresholds by -grad: up when L0 is above the target.
    assert np.all(grad <= 0) if l0 > target else np.all(grad >= 0)


def test_pre_activation_loss_lifts_dead_latents_only():
    x = jnp.asarray(_data(128))
    sae = _jumprelu("step", pre_act_loss_coefficient=0.5)
    params = sae.init_params(jax.random.key(0), x)
    alive = sae.loss(params, {}, x, LossContext(jnp.float32(1.0), jnp.zeros(WIDTH, bool)))
    assert float(alive[1]["parts"]["pre_act_loss"]) == 0.0
    dead = jnp.zeros(WIDTH, bool).at[:10].set(True)
    loss, out = sae.loss(params, {}, x, LossContext(jnp.float32(1.0), dead))
    pre = np.asarray(pre_activations(params, x, "float32"))
    expected = np.mean(np.sum(np.maximum(0.3 - pre[:, :10], 0.0), axis=-1))
    np.testing.assert_allclose(float(out["parts"]["pre_act_loss"]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(loss) - float(alive[0]), 0.5 * expected, rtol=1e-4)
    grad = jax.grad(lambda p: sae.loss(p, {}, x, LossContext(jnp.float32(0.0), dead))[0])(params)
    # The pre-activation loss reaches only the dead latents' encoder columns (sparsity off).
    mse_only = jax.grad(
        lambda p: sae.loss(p, {}, x, LossContext(jnp.float32(0.0), jnp.zeros(WIDTH, bool)))[0]
    )(params)
    differs = np.any(np.asarray(grad["W_enc"]) != np.asarray(mse_only["W_enc"]), axis=0)
    assert differs[:10].all() and not differs[10:].any()


@pytest.mark.parametrize("num_dead", [0, 3, 8, 13, 40, 90, 128])
def test_auxk_over_the_dead_subset_matches_the_masked_form(num_dead):
    """The gathered form (the dead latents in a fixed-size subset) gives the loss and gradients
    of the plain masked top-k over the full width, whichever subset size the dead count picks."""
    from sae.arch import sparse_ops
    from sae.arch.auxk import auxk_loss

    rng = np.random.default_rng(num_dead)
    tokens, width, d, k_aux = 12, 128, 16, 8
    params = {
        "W_dec": jnp.asarray(rng.normal(size=(width, d)), jnp.float32),
        "b_dec": jnp.zeros(d),
    }
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    reconstruction = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    pre = jnp.asarray(rng.normal(size=(tokens, width)), jnp.float32)
    dead = jnp.zeros(width, bool).at[rng.permutation(width)[:num_dead]].set(True)

    def masked_reference(params, pre):
        masked = jnp.where(dead, pre, -jnp.inf)
        cutoff = sparse_ops.top_k(masked, k_aux)[0][:, -1:]
        latents = jnp.where(dead & (masked >= cutoff), jax.nn.relu(pre), 0.0)
        prediction = latents @ params["W_dec"]
        residual = x - reconstruction
        loss = jnp.sum((residual - prediction) ** 2) / jnp.sum((residual - residual.mean(0)) ** 2)
        return jnp.where(num_dead > 0, jnp.minimum(num_dead / k_aux, 1.0) * loss, 0.0)

    def gathered(params, pre):
        return auxk_loss(params, x, reconstruction, pre, dead, k_aux, "float32")

    want, want_grads = jax.value_and_grad(masked_reference, argnums=(0, 1))(params, pre)
    got, got_grads = jax.jit(jax.value_and_grad(gathered, argnums=(0, 1)))(params, pre)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
