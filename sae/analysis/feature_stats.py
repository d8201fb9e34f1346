"""Per-feature activation histograms and random activation samples, in one evaluation pass.

Both live on the device and are updated inside the evaluation's jitted step from the latents it
already computed, so memory is fixed by the number of latents, not by the number of tokens:

- Histogram: counts per latent over one fixed grid of log-spaced bins, `BINS_PER_DECADE` per
  decade from `GRID_LOW` to `GRID_HIGH`, plus an underflow bin (0, GRID_LOW) and an overflow
  bin [GRID_HIGH, inf). A fixed grid needs no first pass to learn each feature's scale; log
  spacing keeps the relative resolution the same for weak and strong features.
- Samples: a uniform random sample without replacement of up to `SAMPLES` of each latent's
  firings (value, sequence, position): every firing gets an independent uniform key and the
  `SAMPLES` largest keys seen so far are kept (reservoir sampling by random priorities), so the
  kept set is a uniform sample of everything seen, however the firings fall into batches.

"Quantile bands" (`quantile_bands`) are then estimated from the histogram (all firings,
interpolated log-linearly within a bin, clamped to the observed minimum and maximum), and each
sampled firing is put in the band its value falls in: the samples of band q are random
firings whose activation lies between the feature's estimated q/Q and (q+1)/Q quantiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

GRID_LOW = 1e-3
GRID_HIGH = 1e4
BINS_PER_DECADE = 8
SAMPLES = 32
_DECADES = round(np.log10(GRID_HIGH / GRID_LOW))
# Bin edges: 0, the log grid, inf; bin i holds values in [EDGES[i], EDGES[i + 1]), bin 0 (0, ...).
EDGES = np.concatenate(
    [[0.0], GRID_LOW * 10.0 ** (np.arange(_DECADES * BINS_PER_DECADE + 1) / BINS_PER_DECADE)]
    + [[np.inf]]
)
NUM_BINS = len(EDGES) - 1

State = dict[str, jax.Array]


def init_state(d_sae: int, seed: int = 0, samples: int = SAMPLES) -> State:
    """Empty accumulators for `d_sae` latents (a pytree of device arrays)."""
    return {
        "histogram": jnp.zeros((d_sae, NUM_BINS), jnp.int32),
        "min": jnp.full((d_sae,), jnp.inf, jnp.float32),
        "sample_keys": jnp.full((d_sae, samples), -1.0, jnp.float32),
        "sample_values": jnp.zeros((d_sae, samples), jnp.float32),
        "sample_sequence": jnp.full((d_sae, samples), -1, jnp.int32),
        "sample_position": jnp.full((d_sae, samples), -1, jnp.int32),
        "rng": jax.random.PRNGKey(seed),
    }


# Lower edge of every bin in float32 (what activations are compared with), then infinity.
_LOWER = np.concatenate([EDGES[:-1], [np.inf]]).astype(np.float32)


def bin_counts_dense(latents: jax.Array) -> jax.Array:
    """[d_sae, NUM_BINS] firings per bin of a batch: values at or above each edge counted by
    dense reductions, then differenced. Used on TPUs, which favour dense reductions over a
    scatter-add of one update per value (a choice not yet measured on a TPU)."""
    at_least = [jnp.sum(latents >= edge, axis=0, dtype=jnp.int32) for edge in _LOWER[1:-1]]
    fires = jnp.sum(latents > 0, axis=0, dtype=jnp.int32)
    cumulative = jnp.stack([fires, *at_least, jnp.zeros_like(fires)], axis=1)
    return cumulative[:, :-1] - cumulative[:, 1:]


def bin_counts_scatter(latents: jax.Array) -> jax.Array:
    """The same counts from one bin index per value (its logarithm, corrected against the
    exact edges) and a bincount: over ten times faster than `bin_counts_dense` on CPU."""
    decades = jnp.log10(jnp.maximum(latents, 1e-30)) - np.log10(GRID_LOW)
    guess = jnp.floor(decades * BINS_PER_DECADE) + 1
    guess = jnp.clip(guess.astype(jnp.int32), 0, NUM_BINS - 1)
    lower = jnp.asarray(_LOWER)
    index = guess + (latents >= lower[guess + 1]) - (latents < lower[guess])
    index = jnp.where(latents > 0, index, NUM_BINS)  # inactive: a discarded extra bin
    flat = index + (NUM_BINS + 1) * jnp.arange(latents.shape[1])[None, :]
    counts = jnp.bincount(flat.ravel(), length=(NUM_BINS + 1) * latents.shape[1])
    return counts.reshape(latents.shape[1], NUM_BINS + 1)[:, :-1].astype(jnp.int32)


def update(state: State, latents: jax.Array, first_sequence: jax.Array, seq_len: int) -> State:
    """Add one batch of latents [rows, d_sae] (rows = sequences x positions, flattened, zero
    where masked out) to the accumulators. Traceable: call it inside the evaluation's jit."""
    latents = latents.astype(jnp.float32)
    active = latents > 0
    count = bin_counts_dense if jax.default_backend() == "tpu" else bin_counts_scatter
    histogram = state["histogram"] + count(latents)
    minimum = jnp.minimum(state["min"], jnp.min(jnp.where(active, latents, jnp.inf), axis=0))

    rng, key = jax.random.split(state["rng"])
    priority = jnp.where(active, jax.random.uniform(key, latents.shape), -1.0)
    k = min(state["sample_keys"].shape[1], latents.shape[0])
    batch_keys, rows = jax.lax.top_k(priority.T, k)  # [d_sae, k]
    columns = jnp.arange(latents.shape[1])[:, None]
    keys = jnp.concatenate([state["sample_keys"], batch_keys], axis=1)
    candidates = {
        "sample_values": (state["sample_values"], latents[rows, columns]),
        "sample_sequence": (state["sample_sequence"], first_sequence + rows // seq_len),
        "sample_position": (state["sample_position"], rows % seq_len),
    }
    kept_keys, order = jax.lax.top_k(keys, state["sample_keys"].shape[1])
    merged = {
        name: jnp.take_along_axis(jnp.concatenate([old, new.astype(old.dtype)], 1), order, 1)
        for name, (old, new) in candidates.items()
    }
    return {"histogram": histogram, "min": minimum, "sample_keys": kept_keys, **merged, "rng": rng}


@dataclass
class FeatureStats:
    """The accumulators read back to the host at the end of the evaluation."""

    histogram: np.ndarray  # [d_sae, NUM_BINS] firings per bin of EDGES
    min_activations: np.ndarray  # [d_sae] smallest positive activation (inf if never active)
    sample_values: np.ndarray  # [d_sae, SAMPLES], 0 where fewer firings than SAMPLES
    sample_refs: np.ndarray  # [d_sae, SAMPLES, 2] (sequence, position), -1 where empty

    @classmethod
    def from_state(cls, state: State) -> FeatureStats:
        host = jax.device_get(state)
        refs = np.stack([host["sample_sequence"], host["sample_position"]], axis=-1)
        return cls(
            np.asarray(host["histogram"], np.int64),
            np.asarray(host["min"], np.float32),
            np.asarray(host["sample_values"], np.float32),
            refs.astype(np.int64),
        )

    def histogram_of(self, index: int, max_activation: float) -> dict[str, list]:
        """The feature's histogram trimmed to its non-empty bins; the outer edges are its
        observed minimum and maximum (so all edges are finite), the inner ones the grid's."""
        counts = self.histogram[index]
        nonzero = np.flatnonzero(counts)
        if len(nonzero) == 0:
            return {"edges": [], "counts": []}
        first, last = int(nonzero[0]), int(nonzero[-1])
        edges = EDGES[first : last + 2].copy()
        edges[0] = float(self.min_activations[index])
        edges[-1] = float(max_activation)
        return {
            "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts[first : last + 1]],
        }

    def samples_of(self, index: int) -> list[tuple[float, int, int]]:
        """The kept (value, sequence, position) firings of a feature, in random order."""
        values, refs = self.sample_values[index], self.sample_refs[index]
        return [
            (float(v), int(s), int(p))
            for v, (s, p) in zip(values, refs, strict=True)
            if v > 0 and s >= 0
        ]


def quantile_edges(histogram: dict[str, list], bands: int) -> np.ndarray:
    """`bands + 1` estimated quantiles (0, 1/bands, ..., 1) of a feature's activations from its
    trimmed histogram (`FeatureStats.histogram_of`), log-linear within a bin."""
    counts = np.asarray(histogram["counts"], np.float64)
    edges = np.asarray(histogram["edges"], np.float64)
    if counts.sum() == 0:
        return np.zeros(bands + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    result = [edges[0]]
    for q in range(1, bands):
        target = cumulative[-1] * q / bands
        i = int(np.searchsorted(cumulative, target, side="left")) - 1
        i = min(max(i, 0), len(counts) - 1)
        fraction = (target - cumulative[i]) / counts[i] if counts[i] else 0.0
        low, high = edges[i], edges[i + 1]
        value = low * (high / low) ** fraction if low > 0 else low + (high - low) * fraction
        result.append(max(value, result[-1]))
    result.append(max(edges[-1], result[-1]))
    return np.asarray(result)


def quantile_bands(
    histogram: dict[str, list], samples: list[tuple[float, int, int]], bands: int
) -> list[dict]:
    """The feature's `bands` quantile bands, each with its range and the sampled firings whose
    value falls in it (in the order given: random, for `FeatureStats.samples_of`)."""
    edges = quantile_edges(histogram, bands)
    members: list[list[tuple[float, int, int]]] = [[] for _ in range(bands)]
    for sample in samples:
        band = int(np.searchsorted(edges[1:-1], sample[0], side="right"))
        members[band].append(sample)
    return [
        {
            "quantile_low": q / bands,
            "quantile_high": (q + 1) / bands,
            "activation_low": float(edges[q]),
            "activation_high": float(edges[q + 1]),
            "samples": members[q],
        }
        for q in range(bands)
    ]
