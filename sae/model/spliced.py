"""Spliced metrics: the language model's next-token loss with an SAE's reconstruction put in
place of the activation it reads (REFERENCE "Metric definitions"; SAELens' names), or with a
transcoder's prediction put in place of the MLP output it learned (site "mlp_out").

One jitted function per tapped layer runs the model once up to `decoder_block_<layer>`, then
the remaining blocks, final norm and tied-embedding logits (with Gemma 2's final soft-cap) on
several residual streams: clean, zero-ablated, optionally mean-ablated (the activation's mean
over training tokens), and each SAE's reconstruction. At the "mlp_out" site block `layer`
itself runs once per path, its MLP output replaced (zeros, the mean MLP output, each
transcoder's prediction from the MLP's input; sae.model.lm.mlp_hook). Shapes are fixed
(every batch padded to the same size), so it compiles once.

Which positions:
- substituted (SAE and zero ablation alike): content tokens only. BOS keeps its clean
  activation, as in SAELens and Gemma Scope: the SAE was not trained on it (its activation is
  an outlier, see `activations.content_mask`), and padding is never attended to.
- scored: position t predicts token t+1 wherever both are real tokens (not padding); a BOS
  target in a packed sequence counts like any other token.
Losses and KL divergences are means over all scored positions of the evaluated sequences.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sae import sharding
from sae.arch import token_norm
from sae.arch.base import Params, SparseAutoencoder
from sae.data.activations import content_mask, sequence_batches
from sae.errors import InputError
from sae.model import lm
from sae.sharding import DATA

# (params, activations [tokens, d_model]) -> the activations to substitute, same shape.
Reconstruct = Callable[[Params, jax.Array], jax.Array]

# float32 logits held at once (over paths, batch and a chunk of positions): 2^28 = 1 GiB.
# The vocabulary is large (256k for Gemma), so logits are made and reduced chunk by chunk.
LOGITS_BUDGET = 2**28

# CE loss recovered is (ablated - spliced) / (ablated - clean). When the ablation costs less
# than this many nats per position (text far from the model's training data, where zeroing a
# layer can even help), the ratio is noise or meaningless (1.05 once looked like a perfect
# score), so it is reported as undefined and delta LM loss and KL are what remain.
MIN_ABLATION_GAP = 0.1


@dataclass
class SplicedModel:
    """One activation substitute at the evaluator's layer: an SAE, or a test's stand-in."""

    reconstruct: Reconstruct
    params: dict[str, np.ndarray]


def sae_model(sae: SparseAutoencoder, params: dict[str, np.ndarray]) -> SplicedModel:
    """The SAE's reconstruction of raw activations (saved SAEs have the input scale folded in,
    so they read activations exactly as the model produces them)."""
    return SplicedModel(lambda p, x: token_norm.encode_decode(sae, p, x)[1], params)


@dataclass
class SplicedSums:
    """Sums over scored positions; index 0 is the clean run, 1 zero ablation, then (with
    `mean_ablation`) the mean-ablated run, then model i."""

    positions: int
    ce: np.ndarray  # [paths] summed next-token cross-entropy (nats)
    kl: np.ndarray  # [paths] summed KL(clean || path)
    mean_ablation: bool = False

    def __add__(self, other: SplicedSums) -> SplicedSums:
        return SplicedSums(
            self.positions + other.positions,
            self.ce + other.ce,
            self.kl + other.kl,
            self.mean_ablation,
        )

    def metrics(self, model: int) -> dict[str, float | None]:
        """The field's metrics for model `model` (its index among the evaluator's models);
        CE loss recovered is None (JSON null) when the ablation does not cost clearly more
        than the clean run (MIN_ABLATION_GAP; `recovery_warnings` says why). With mean
        ablation, the same against it: a far stronger baseline than zeros, which a residual
        stream's few huge dimensions make easy to beat."""
        n = max(self.positions, 1)
        index = 2 + self.mean_ablation + model
        clean, zero, spliced = (float(self.ce[i]) / n for i in (0, 1, index))
        metrics = {
            "spliced_eval_positions": self.positions,
            "ce_loss_clean": clean,
            "ce_loss_with_sae": spliced,
            "ce_loss_zero_ablation": zero,
            "ce_loss_recovered": _recovered(zero, spliced, clean),
            "delta_lm_loss": spliced - clean,
            "kl_div_with_sae": float(self.kl[index]) / n,
            "kl_div_zero_ablation": float(self.kl[1]) / n,
        }
        if self.mean_ablation:
            mean = float(self.ce[2]) / n
            metrics["ce_loss_mean_ablation"] = mean
            metrics["ce_loss_recovered_vs_mean_ablation"] = _recovered(mean, spliced, clean)
            metrics["kl_div_mean_ablation"] = float(self.kl[2]) / n
        return metrics


def _recovered(ablated: float, spliced: float, clean: float) -> float | None:
    gap = ablated - clean
    return (ablated - spliced) / gap if gap >= MIN_ABLATION_GAP else None


# (ratio, its ablation's CE loss, the baseline's name) of each CE-recovered metric.
_RECOVERED = (
    ("ce_loss_recovered", "ce_loss_zero_ablation", "zero"),
    ("ce_loss_recovered_vs_mean_ablation", "ce_loss_mean_ablation", "mean"),
)


def recovery_warnings(metrics: dict[str, Any]) -> list[str]:
    """One line per CE-recovered ratio of `metrics` (SplicedSums.metrics) left undefined
    because its ablation was not clearly worse than the clean run."""
    return [
        f"{ratio} undefined: the {baseline}-ablated CE loss {metrics[ablated]:.4g} is not "
        f"{MIN_ABLATION_GAP} nats above the clean {metrics['ce_loss_clean']:.4g}, so the ratio "
        "means nothing on this text; judge by delta_lm_loss and kl_div_with_sae"
        for ratio, ablated, baseline in _RECOVERED
        if ablated in metrics and metrics.get(ratio) is None
    ]


def mean_model(mean: np.ndarray) -> SplicedModel:
    """Every substituted activation replaced by `mean` (its mean over training tokens)."""
    return SplicedModel(lambda p, x: jnp.broadcast_to(p["mean"], x.shape), {"mean": mean})


class SplicedLoss:
    """Clean, zero-ablated and spliced next-token losses at one layer, batch by batch."""

    def __init__(
        self,
        backbone: Any,
        layer: int,
        models: list[SplicedModel],
        mesh: Mesh,
        bos_id: int,
        mean: np.ndarray | None = None,
        site: str = "resid_post",
    ) -> None:
        """`mean`: the activation's mean over training tokens, for a mean-ablated path.
        `site`: "resid_post" (SAEs: the residual stream after the block) or "mlp_out"
        (transcoders: the block's MLP output, predicted from its input)."""
        lm.check_gemma(backbone)
        if site not in ("resid_post", "mlp_out"):
            raise ValueError(f"unknown splice site {site!r}")
        self.backbone, self.layer, self.mesh, self.bos_id = backbone, layer, mesh, bos_id
        self.site = site
        self.mean_ablation = mean is not None
        if mean is not None:
            models = [mean_model(np.asarray(mean, np.float32)), *models]
        self.reconstructs = [m.reconstruct for m in models]
        replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        self._weights, placed = sharding.place_weights(lm.backbone_weights(backbone), mesh)
        self._params = jax.device_put(
            [{k: jnp.asarray(v, jnp.float32) for k, v in m.params.items()} for m in models],
            replicated,
        )
        self._sums = jax.jit(
            self._batch_sums,
            in_shardings=(placed, replicated, batch, batch, batch),
            out_shardings=replicated,
        )

    def _substitutes(self, params, read: jax.Array) -> list[jax.Array]:
        """Each model's substitute for `read`, computed from `read` itself (a transcoder's MLP
        output from the MLP input, passed as `read`), in `read`'s shape."""
        flat = read.astype(jnp.float32).reshape(-1, read.shape[-1])
        return [
            reconstruct(p, flat).reshape(read.shape)
            for reconstruct, p in zip(self.reconstructs, params, strict=True)
        ]

    def _residual_paths(self, params, token_ids, padding_mask, keep) -> list[jax.Array]:
        """Each path's residual stream after block `layer`, its SAE substituted there."""
        tapped = lm.run_to_layer(self.backbone, token_ids, padding_mask, self.layer)
        streams = [tapped, jnp.zeros_like(tapped), *self._substitutes(params, tapped)]
        return [jnp.where(keep, s.astype(tapped.dtype), tapped) for s in streams]

    def _mlp_paths(self, params, token_ids, padding_mask, keep) -> list[jax.Array]:
        """Each path's residual stream after block `layer`, the block re-run with its MLP
        output replaced where `keep` (clean: itself)."""
        backbone, block = self.backbone, self.backbone.transformer_layers[self.layer]
        entering = lm.run_blocks(
            backbone, lm.embed(backbone, token_ids), padding_mask, 0, self.layer
        )
        clean, mlp_in, mlp_out = lm.call_with_mlp(block, entering, padding_mask)
        outputs = [jnp.zeros_like(mlp_out), *self._substitutes(params, mlp_in)]
        paths = [clean]
        for out in outputs:
            with lm.mlp_hook(block, lambda _, original, o=out: jnp.where(keep, o, original)):
                paths.append(block(entering, padding_mask=padding_mask))
        return paths

    def _batch_sums(self, weights, params, token_ids, padding_mask, substitute):
        backbone = self.backbone
        keep = substitute[..., None]
        with lm.bound_weights(backbone, weights):
            paths = self._mlp_paths if self.site == "mlp_out" else self._residual_paths
            streams = paths(params, token_ids, padding_mask, keep)
            # Every path, clean included, runs the same blocks so they differ only in the splice.
            finals = jnp.stack(
                [
                    lm.run_blocks(
                        backbone, stream, padding_mask, self.layer + 1, backbone.num_layers
                    )
                    for stream in streams
                ]
            )
            scored = (padding_mask[:, :-1] > 0) & (padding_mask[:, 1:] > 0)
            ce, kl = _head_sums(backbone, finals[:, :, :-1], token_ids[:, 1:], scored)
        return jnp.sum(scored), ce, kl

    def __call__(self, token_ids: np.ndarray, lengths: np.ndarray) -> SplicedSums:
        positions = np.arange(token_ids.shape[1])[None, :]
        padding_mask = (positions < lengths[:, None]).astype(np.int32)
        substitute = content_mask(token_ids, lengths, self.bos_id)
        inputs = (token_ids.astype(np.int32), padding_mask, substitute)
        if jax.process_count() > 1:
            # Multi-host: each host passes its own sequences; the sums are over all hosts'.
            inputs = multihost_utils.host_local_array_to_global_array(inputs, self.mesh, P(DATA))
            out = self._sums(self._weights, self._params, *inputs)
            out = multihost_utils.global_array_to_host_local_array(out, self.mesh, P())
        else:
            out = self._sums(self._weights, self._params, *inputs)
        count, ce, kl = jax.device_get(out)
        ce, kl = np.asarray(ce, np.float64), np.asarray(kl, np.float64)
        return SplicedSums(int(count), ce, kl, self.mean_ablation)


def _head_sums(
    backbone: Any, finals: jax.Array, targets: jax.Array, scored: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and KL(clean || path) per path over scored positions, from the
    last block's outputs finals [paths, batch, positions, hidden] (path 0 is clean)."""
    paths, batch, length, hidden = finals.shape
    vocab = backbone.vocabulary_size
    chunk = max(1, min(length, LOGITS_BUDGET // (paths * batch * vocab)))
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    finals = jnp.pad(finals, ((0, 0), (0, 0), (0, pad), (0, 0)))
    finals = finals.reshape(paths, batch, chunks, chunk, hidden).transpose(2, 0, 1, 3, 4)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, chunks, chunk).swapaxes(0, 1)
    weight = jnp.pad(scored, ((0, 0), (0, pad))).astype(jnp.float32)
    weight = weight.reshape(batch, chunks, chunk).swapaxes(0, 1)

    def one_chunk(args):
        x, target, w = args
        logits = lm.final_logits(backbone, x).astype(jnp.float32)  # [paths, batch, chunk, V]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        target_log_probs = jnp.take_along_axis(log_probs, target[None, ..., None], axis=-1)
        clean = log_probs[0]
        kl = jnp.sum(jnp.exp(clean) * (clean - log_probs), axis=-1)
        return -jnp.sum(target_log_probs[..., 0] * w, axis=(1, 2)), jnp.sum(kl * w, axis=(1, 2))

    ce, kl = jax.lax.map(one_chunk, (finals, targets, weight))
    return ce.sum(axis=0), kl.sum(axis=0)


def evaluate_spliced(
    loss: SplicedLoss,
    sequences: Iterator[tuple[np.ndarray, int]],
    batch_size: int,
    max_sequences: int,
    progress=None,
) -> SplicedSums:
    """Sums over the first `max_sequences` sequences, in fixed-size batches."""
    total: SplicedSums | None = None
    for token_ids, lengths in sequence_batches(
        itertools.islice(sequences, max_sequences), batch_size
    ):
        sums = loss(token_ids, lengths)
        total = sums if total is None else total + sums
        if progress is not None:
            progress.update(int(np.sum(lengths > 0)))
    if total is None or total.positions == 0:
        raise InputError(
            "no held-out positions to score for the spliced metrics (sequences of one token?)"
        )
    return total
