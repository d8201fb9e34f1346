"""Training from stored activation rows: plain `.npy` files of shape [tokens, d_model].

Rows are drawn in a seeded pseudo-random order that is a bijection of the row indices per
epoch (a Feistel network with cycle walking), so the batch at any step is computed directly:
resuming at step N costs nothing, needs no replay, and no permutation table is stored however
many rows there are. gs:// files are copied to the local cache once and memory-mapped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from sae.errors import InputError
from sae.io import storage

_ROUNDS = 4
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def find_activation_files(spec: str) -> list[str]:
    """The .npy files named by a URI, glob, directory or comma-separated list; error when
    none."""
    files = storage.match_files(spec)
    if not files:
        raise InputError(f"no activation files match {spec}")
    return files


class NpyRows:
    """Several `.npy` files (or in-memory arrays) seen as one table of rows."""

    def __init__(self, uris: list[str]) -> None:
        if not uris:
            raise InputError("no activation files given")
        arrays = []
        for uri in uris:
            try:
                array = np.load(storage.local_copy(uri), mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as error:
                raise InputError(f"{uri} is not a readable .npy file: {error}") from None
            arrays.append(array)
        self._set_arrays(uris, arrays)

    @classmethod
    def in_memory(cls, array: np.ndarray) -> NpyRows:
        """One array already in memory (a notebook's activations), named `array`."""
        rows = cls.__new__(cls)
        rows._set_arrays(["array"], [np.asarray(array)])
        return rows

    def _set_arrays(self, uris: list[str], arrays: list[np.ndarray]) -> None:
        for uri, array in zip(uris, arrays, strict=True):
            if array.ndim != 2 or array.shape[0] == 0:
                raise InputError(f"{uri} has shape {array.shape}; expected [tokens, d_model]")
            if not np.issubdtype(array.dtype, np.floating):
                raise InputError(f"{uri} holds {array.dtype}; expected floating-point rows")
        self.uris, self.arrays = uris, arrays
        dims = {a.shape[1] for a in self.arrays}
        if len(dims) > 1:
            raise InputError(f"activation files disagree on d_model: {sorted(dims)}")
        self.dim = dims.pop()
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays])
        self.num_rows = int(self.offsets[-1])

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows at global indices `rows` (any order), as float32."""
        out = np.empty((len(rows), self.dim), np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for index in np.unique(which):
            selected = np.nonzero(which == index)[0]
            local = rows[selected] - self.offsets[index]
            order = np.argsort(local)  # sorted reads are kinder to a memory map
            out[selected[order]] = self.arrays[index][local[order]]
        return out


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 finaliser of values ^ key: the Feistel round function."""
    with np.errstate(over="ignore"):
        z = (values ^ key) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def permute(positions: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded bijection of [0, size) applied to `positions`."""
    half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)
    half_mask = np.uint64((1 << half_bits) - 1)
    keys = _mix(np.arange(_ROUNDS, dtype=np.uint64), np.uint64(seed))

    def feistel(values: np.ndarray) -> np.ndarray:
        left, right = values >> np.uint64(half_bits), values & half_mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & half_mask)
        return (left << np.uint64(half_bits)) | right

    values = feistel(positions.astype(np.uint64))
    # Cycle walking: the network permutes [0, 4^half_bits); repeat until inside [0, size).
    outside = values >= np.uint64(size)
    while outside.any():
        values[outside] = feistel(values[outside])
        outside = values >= np.uint64(size)
    return values.astype(np.int64)


def batch_rows(step: int, batch_size: int, num_rows: int, seed: int) -> np.ndarray:
    """Row indices of batch `step`: epochs follow each other, each in its own order."""
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, within = np.divmod(positions, num_rows)
    rows = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        selected = epochs == epoch
        rows[selected] = permute(within[selected], num_rows, seed * 1_000_003 + int(epoch))
    return rows


def random_batches(
    source: NpyRows, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Endless batches of rows in the seeded order, starting at `start_step`."""
    step = start_step
    while True:
        yield source.read(batch_rows(step, batch_size, source.num_rows, seed))
        step += 1
