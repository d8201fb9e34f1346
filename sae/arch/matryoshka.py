"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose latents
form nested prefixes, `matryoshka_widths`, each of which must reconstruct the input on its own.

The loss adds the squared error of every prefix's reconstruction (the last prefix is the whole
SAE), so the first latents carry the general, frequent features and later ones refine them:
wide dictionaries then split features instead of absorbing one into another. Selection is the
batch's top k * tokens over all latents, as in BatchTopK, and so is inference: a shared
threshold, exported as a JumpReLU (SAELens saves its MatryoshkaBatchTopK the same way).

With `use_matryoshka_aux_loss` the AuxK term is SAELens' per-level one: each level's dead
latents reconstruct what the prefix ending at that level misses. Each level's term is
normalised by its residual's variance, like the plain AuxK here, so `auxk_coefficient` means
the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sae.arch import common
from sae.arch.auxk import aux_latents, auxk_loss
from sae.arch.base import LossContext, Params
from sae.arch.batchtopk import BatchTopKSAE
from sae.errors import ConfigError


@dataclass(frozen=True)
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture: ClassVar[str] = "matryoshka_batchtopk"

    def __post_init__(self) -> None:
        widths = self.spec.matryoshka_widths
        if not widths or widths[-1] != self.d_sae:
            raise ConfigError(
                f"matryoshka_widths {list(widths)} must end at the SAE's width {self.d_sae}"
            )

    def export_config(self) -> dict[str, Any]:
        return {
            **super().export_config(),
            "trained_as": self.architecture,
            "matryoshka_widths": list(self.spec.matryoshka_widths),
        }

    def levels(self) -> list[tuple[int, int]]:
        """[start, stop) of the latents each level adds."""
        widths = self.spec.matryoshka_widths
        return list(zip((0, *widths[:-1]), widths, strict=True))

    def prefix_reconstructions(
        self, params: Params, x: jax.Array, latents: jax.Array
    ) -> list[jax.Array]:
        """The output from each prefix of the latents, narrowest first (a transcoder's skip
        in each); each level's slice of the decoder is multiplied once, so all of them cost
        one full decode."""
        dtype = jnp.dtype(self.matmul_dtype)
        base = params["b_dec"] + self.skip_output(params, x)
        reconstruction = jnp.broadcast_to(base, (latents.shape[0], self.d_model))
        reconstructions = []
        for start, stop in self.levels():
            reconstruction = reconstruction + jnp.matmul(
                latents[:, start:stop].astype(dtype),
                params["W_dec"][start:stop].astype(dtype),
                preferred_element_type=jnp.float32,
            )
            reconstructions.append(reconstruction)
        return reconstructions

    def loss(
        self,
        params: Params,
        buffers: Params,
        x: jax.Array,
        ctx: LossContext,
        target: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        target = x if target is None else target
        pre = self.pre_activations(params, x)
        latents, active, cutoff = self.select(pre)
        reconstructions = self.prefix_reconstructions(params, x, latents)
        errors = [common.squared_error(target, r) for r in reconstructions]
        k_aux = aux_latents(self.spec.k_aux, self.d_model, self.d_sae)
        if self.spec.use_matryoshka_aux_loss:
            latent = jnp.arange(self.d_sae)
            auxk = sum(
                auxk_loss(
                    params,
                    target,
                    level_reconstruction,
                    pre,
                    ctx.dead & (latent >= start) & (latent < stop),
                    k_aux,
                    self.matmul_dtype,
                    candidates=stop - start,
                )
                for (start, stop), level_reconstruction in zip(
                    self.levels(), reconstructions, strict=True
                )
            )
        else:
            auxk = auxk_loss(
                params, target, reconstructions[-1], pre, ctx.dead, k_aux, self.matmul_dtype
            )
        parts = {"mse": errors[-1], "auxk": auxk}
        parts.update(
            {
                f"inner_mse_{stop}": e
                for (_, stop), e in zip(self.levels(), errors[:-1], strict=False)
            }
        )
        outputs = common.dense_outputs(reconstructions[-1], active, parts)
        loss = sum(errors) + self.spec.auxk_coefficient * auxk
        return loss, {**outputs, "cutoff": cutoff}
