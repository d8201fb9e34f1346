"""Activation streams: token sequences -> language-model activations -> shuffled training batches.

Nothing large is held: one token shard, one language-model batch, and a bounded shuffle buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sae import token_shards

# (token_ids, lengths) -> activations per layer: host arrays, or device arrays still being
# computed (read one batch later, so the next forward overlaps the host's work).
TapFn = Callable[[np.ndarray, np.ndarray], list[Any]]


def content_mask(token_ids: np.ndarray, lengths: np.ndarray, bos_id: int) -> np.ndarray:
    """Positions that are real tokens: not padding and not BOS (whose activations are
    outliers that would dominate an SAE's loss)."""
    positions = np.arange(token_ids.shape[1])[None, :]
    return (positions < lengths[:, None]) & (token_ids != bos_id)


def sequence_batches(
    sequences: Iterator[tuple[np.ndarray, int]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Group sequences into (token_ids [batch, seq], lengths [batch]); the last batch is padded
    with empty rows (length 0) so every forward pass has the same, compiled-once shape."""
    tokens: list[np.ndarray] = []
    lengths: list[int] = []
    for sequence, length in sequences:
        tokens.append(sequence)
        lengths.append(length)
        if len(tokens) == batch_size:
            yield np.stack(tokens), np.asarray(lengths, np.int32)
            tokens, lengths = [], []
    if tokens:
        pad = batch_size - len(tokens)
        yield (
            np.concatenate([np.stack(tokens), np.zeros((pad, tokens[0].shape[0]), np.int32)]),
            np.asarray(lengths + [0] * pad, np.int32),
        )


class ShuffleBuffer:
    """A fixed-capacity pool of rows; batches are drawn at random once it is full, so rows from
    many sequences and documents mix while memory stays at `capacity` rows."""

    def __init__(self, capacity: int, dim: int, seed: int) -> None:
        self.data = np.empty((capacity, dim), np.float32)
        self.size = 0
        self.rng = np.random.default_rng(seed)

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    def batches(
        self, chunks: Iterator[np.ndarray], batch_size: int, drain: bool = True
    ) -> Iterator[np.ndarray]:
        for chunk in chunks:
            while len(chunk):
                take = min(len(chunk), self.capacity - self.size)
                self.data[self.size : self.size + take] = chunk[:take]
                self.size += take
                chunk = chunk[take:]
                while self.size == self.capacity:
                    yield self._pop(batch_size)
        while drain and self.size >= batch_size:
            yield self._pop(batch_size)

    def _pop(self, batch_size: int) -> np.ndarray:
        chosen = self.rng.choice(self.size, size=batch_size, replace=False)
        batch = self.data[chosen].copy()
        # Swap-remove: rows from the tail fill the chosen slots that lie before it.
        new_size = self.size - batch_size
        holes = chosen[chosen < new_size]
        tail = np.setdiff1d(np.arange(new_size, self.size), chosen, assume_unique=True)
        self.data[holes] = self.data[tail]
        self.size = new_size
        return batch


def activation_chunks(
    sequences: Iterator[tuple[np.ndarray, int]],
    tap: TapFn,
    lm_batch_size: int,
    bos_id: int,
) -> Iterator[np.ndarray]:
    """Rows [n, layers * hidden]: every tapped layer side by side (so SAEs on different layers
    see the same tokens), BOS and padding positions dropped. One forward stays in flight: the
    next batch is dispatched before the previous one's activations are read."""

    def rows(outputs: list[Any], token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        layers = [np.asarray(out) for out in outputs]
        activations = layers[0] if len(layers) == 1 else np.concatenate(layers, axis=-1)
        return activations[content_mask(token_ids, lengths, bos_id)]

    in_flight = None
    for token_ids, lengths in sequence_batches(sequences, lm_batch_size):
        dispatched = (tap(token_ids, lengths), token_ids, lengths)
        if in_flight is not None:
            yield rows(*in_flight)
        in_flight = dispatched
    if in_flight is not None:
        yield rows(*in_flight)


def training_batches(
    shards: list[str],
    tap: TapFn,
    row_dim: int,
    lm_batch_size: int,
    batch_size: int,
    buffer_rows: int,
    bos_id: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """An endless, seeded stream of shuffled activation batches over the train shards (epochs
    repeat with a new shard and row order). The same seed replays the same stream, which is
    how a resumed run finds its exact data position."""
    sequences = token_shards.iter_sequences(shards, seed=seed, epochs=None)
    chunks = activation_chunks(sequences, tap, lm_batch_size, bos_id)
    return ShuffleBuffer(buffer_rows, row_dim, seed).batches(chunks, batch_size, drain=False)
