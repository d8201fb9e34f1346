"""The activation store: extracted activation rows cached on disk or GCS for many runs.

Layout under the store's URI: one part per writing host, one zarr v3 array per tapped site
(written through tensorstore, bf16 by default, chunked by rows), and the extract stage's
manifest last:

    part-00000/layer_12/zarr.json, c/...      [rows, d_model] residual stream after block 12
    part-00000/mlp_in_12/..., mlp_out_12/...  block 12's MLP input and output (transcoders)
    part-00000/rows.json                      rows, sites and norm sums of this part (last)
    manifest.json

Reading visits the chunks of all parts in a seeded random order, a window of chunks at a
time, and shuffles the rows within each window; so batches mix tokens from distant documents
while memory holds one window (plus the next, being fetched). The order is a pure function of
(seed, step): a resumed run computes where step N starts and reads from there, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import tensorstore as ts

from sae.arch.spec import Site
from sae.errors import InputError
from sae.io import manifest, storage

PART_ROWS_NAME = "rows.json"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def part_uri(store_uri: str, part: int) -> str:
    return storage.join(store_uri, f"part-{part:05d}")


def as_sites(sites: Sequence[int | Site]) -> list[Site]:
    """Sites, where a bare layer index means the residual stream after that block."""
    return [site if isinstance(site, Site) else Site(int(site)) for site in sites]


def site_uri(part: str, site: Site) -> str:
    name = "layer" if site.point == "resid_post" else site.point
    return storage.join(part, f"{name}_{site.layer:02d}")


def record_sites(record: dict) -> list[str]:
    """The site labels a part's record holds (stores written before sites: `layers`)."""
    if "sites" in record:
        return list(record["sites"])
    return [Site(int(layer)).label for layer in record["layers"]]


def _spec(uri: str) -> dict[str, object]:
    return {"driver": "zarr3", "kvstore": storage.tensorstore_kvstore(uri)}


def _create(uri: str, rows: int, dim: int, chunk_rows: int, dtype: str) -> ts.TensorStore:
    spec = _spec(uri)
    spec["metadata"] = {
        "shape": [rows, dim],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, dim]}},
        "data_type": dtype,
    }
    # Fails on an existing array: the extract stage clears the whole store first.
    return ts.open(spec, create=True).result()


def _open(uri: str) -> ts.TensorStore:
    try:
        return ts.open(_spec(uri), open=True).result()
    except ValueError as error:
        raise InputError(f"no readable activation array at {uri}: {error}") from None


class _RowQueue:
    """Row blocks of any length in, blocks of a chosen length out."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.size = 0

    def push(self, rows: np.ndarray) -> None:
        if len(rows):
            self.blocks.append(rows)
            self.size += len(rows)

    def pop(self, count: int) -> np.ndarray:
        block = np.concatenate(self.blocks) if len(self.blocks) > 1 else self.blocks[0]
        rest = block[count:]
        self.blocks, self.size = ([rest] if len(rest) else []), len(rest)
        return block[:count]


class PartWriter:
    """Appends rows [n, sites * d_model] (the sites side by side) to one part of a store.

    Rows are buffered to whole chunks and each chunk is written asynchronously, so the model
    keeps running while tensorstore uploads. `capacity` is an upper bound on the rows (the
    arrays are cut to the real count at `close`)."""

    def __init__(
        self,
        part: str,
        sites: Sequence[int | Site],
        d_model: int,
        capacity: int,
        chunk_rows: int,
        dtype: str = "bfloat16",
        max_pending: int = 8,
    ) -> None:
        self.part, self.sites, self.d_model = part, as_sites(sites), d_model
        self.chunk_rows, self.dtype, self.max_pending = chunk_rows, DTYPES[dtype], max_pending
        rows = max(capacity, 1)
        self.arrays = [
            _create(site_uri(part, site), rows, d_model, chunk_rows, dtype) for site in self.sites
        ]
        self.pending: list[ts.Future] = []
        self.queue = _RowQueue()
        self.rows = 0  # written (or being written) to the arrays
        self.norm_sums = np.zeros(len(self.sites), np.float64)

    @property
    def appended(self) -> int:
        """Rows taken so far: written, and waiting for a whole chunk."""
        return self.rows + self.queue.size

    def append(self, rows: np.ndarray) -> None:
        if rows.shape[1] != self.d_model * len(self.sites):
            raise ValueError(f"rows of width {rows.shape[1]}; expected sites * d_model")
        self.queue.push(rows)
        while self.queue.size >= self.chunk_rows:
            self._write(self.queue.pop(self.chunk_rows))

    def _write(self, chunk: np.ndarray) -> None:
        start, count = self.rows, len(chunk)
        if start + count > self.arrays[0].shape[0]:
            raise ValueError(f"more rows than the capacity {self.arrays[0].shape[0]}")
        for index, array in enumerate(self.arrays):
            columns = chunk[:, index * self.d_model : (index + 1) * self.d_model]
            # Rows may come as bfloat16 (a bfloat16 model's tap): the norms are taken in fp32.
            norms = np.linalg.norm(columns.astype(np.float32), axis=1)
            self.norm_sums[index] += float(norms.astype(np.float64).sum())
            self.pending.append(array[start : start + count].write(columns.astype(self.dtype)))
        self.rows += count
        # Bound what is in flight: host memory stays flat however long the run.
        while len(self.pending) > self.max_pending * len(self.arrays):
            self.pending.pop(0).result()

    def close(self) -> dict[str, object]:
        """Write the tail, wait for every write, cut the arrays to the rows written, and write
        the part's record (last, so a part without one is unfinished)."""
        if self.queue.size:
            self._write(self.queue.pop(self.queue.size))
        for future in self.pending:
            future.result()
        self.pending = []
        for array in self.arrays:
            array.resize(exclusive_max=[max(self.rows, 1), self.d_model], shrink_only=True).result()
        record = {
            "rows": self.rows,
            "sites": [site.label for site in self.sites],
            "norm_sums": [float(v) for v in self.norm_sums],
        }
        storage.write_json(storage.join(self.part, PART_ROWS_NAME), record)
        return record


@dataclass(frozen=True)
class Chunk:
    part: int
    start: int
    rows: int


class StoreRows:
    """A finished store seen as one table of rows over the chosen sites (side by side)."""

    def __init__(self, store_uri: str, sites: Sequence[int | Site], parts: Sequence[dict]) -> None:
        self.uri, self.sites = store_uri, as_sites(sites)
        self.part_rows = [int(p["rows"]) for p in parts]
        self.arrays = []
        for index, record in enumerate(parts):
            held = record_sites(record)
            missing = [site.label for site in self.sites if site.label not in held]
            if missing:
                raise InputError(
                    f"the activation store at {store_uri} has {', '.join(held)}, "
                    f"not {', '.join(missing)}: extract them first"
                )
            part = part_uri(store_uri, index)
            self.arrays.append([_open(site_uri(part, site)) for site in self.sites])
        first = self.arrays[0][0]
        self.d_model = int(first.shape[1])
        self.chunk_rows = int(first.chunk_layout.read_chunk.shape[0])
        self.dim = self.d_model * len(self.sites)
        self.num_rows = sum(self.part_rows)
        self.chunks = [
            Chunk(part, start, min(self.chunk_rows, rows - start))
            for part, rows in enumerate(self.part_rows)
            for start in range(0, rows, self.chunk_rows)
        ]
        self.dtype = first.dtype.numpy_dtype
        self.row_bytes = sum(self.d_model * self.dtype.itemsize for _ in self.sites)
        # What this process has asked of the store so far (the per-host read tests count it).
        self.bytes_read = 0

    @property
    def nbytes(self) -> int:
        """The size of the chosen sites' arrays, as read (uncompressed)."""
        return self.num_rows * self.row_bytes

    def read_chunks(self, chunks: Sequence[Chunk]) -> list[ts.Future]:
        """Start reading chunks (every site); the futures resolve to bf16/fp32 arrays."""
        self.bytes_read += sum(c.rows for c in chunks) * self.row_bytes
        return [
            array[c.start : c.start + c.rows].read()
            for c in chunks
            for array in self.arrays[c.part]
        ]

    def assemble(self, chunks: Sequence[Chunk], futures: list[ts.Future]) -> np.ndarray:
        """The chunks' rows in the store's dtype: bfloat16 rows stay bfloat16 on their way to
        the device (half the host memory and transfer), where the step casts them."""
        out = np.empty((sum(c.rows for c in chunks), self.dim), self.dtype)
        row, sites = 0, len(self.sites)
        for index, chunk in enumerate(chunks):
            for site in range(sites):
                data = futures[index * sites + site].result()
                out[row : row + chunk.rows, site * self.d_model : (site + 1) * self.d_model] = data
            row += chunk.rows
        return out


class ShuffledReader:
    """Endless seeded batches from a store: per epoch a permutation of the chunks, cut into
    windows of `window_chunks`; rows shuffled within a window; windows and epochs follow each
    other in one stream, so batch N is rows [N * batch, (N + 1) * batch) of that stream.

    With several groups of hosts (`group` of `groups`; a group: the hosts holding the same rows
    of each batch), each group reads only its own chunks: every `groups`-th of the epoch's
    permutation, from its `group`-th on. `batch_size` and `window_rows` are then the group's
    shares. Together the groups still see every row once per epoch, and each reads about
    1/groups of the store (as each streaming host reads its own token shards)."""

    def __init__(
        self,
        rows: StoreRows,
        batch_size: int,
        window_rows: int,
        seed: int,
        group: int = 0,
        groups: int = 1,
    ) -> None:
        if not 0 <= group < groups:
            raise ValueError(f"group {group} of {groups}")
        if groups > len(rows.chunks):
            raise InputError(
                f"the activation store at {rows.uri} has {len(rows.chunks)} chunks for {groups} "
                "hosts reading their own: extract with a smaller extract.chunk_rows"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.group, self.groups = group, groups
        self.window_chunks = max(1, math.ceil(window_rows / rows.chunk_rows))

    def _epoch_chunks(self, epoch: int) -> list[Chunk]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows.chunks))
        return [self.rows.chunks[i] for i in order[self.group :: self.groups]]

    def _windows(self, epoch: int) -> list[list[Chunk]]:
        chunks = self._epoch_chunks(epoch)
        return [
            chunks[i : i + self.window_chunks] for i in range(0, len(chunks), self.window_chunks)
        ]

    def _schedule(self, position: int) -> Iterator[tuple[int, int, list[Chunk], int]]:
        """(epoch, window index, chunks, rows to skip) from stream position `position` on."""
        epoch, skip = 0, position
        # A group's epoch is its own chunks' rows, which differ a little from epoch to epoch.
        while skip >= (rows := sum(c.rows for c in self._epoch_chunks(epoch))):
            epoch, skip = epoch + 1, skip - rows
        while True:
            start = 0
            for index, window in enumerate(self._windows(epoch)):
                size = sum(c.rows for c in window)
                if start + size > skip:
                    yield epoch, index, window, max(skip - start, 0)
                start += size
            epoch, skip = epoch + 1, 0

    def _stream(self, position: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(window rows, their shuffled order) of the stream from `position` on, a window at a
        time; the next window is fetched while the current one is consumed. Batches gather
        their rows from the window by that order: the window is never copied shuffled."""
        windows = self._schedule(position)
        current = next(windows)
        reads = self.rows.read_chunks(current[2])
        while True:
            upcoming = next(windows)
            upcoming_reads = self.rows.read_chunks(upcoming[2])
            epoch, index, chunks, skip = current
            rows = self.rows.assemble(chunks, reads)
            key = [self.seed, epoch, index, 1] + ([self.group] if self.groups > 1 else [])
            order = np.random.default_rng(key).permutation(len(rows))
            yield rows, order[skip:]
            current, reads = upcoming, upcoming_reads

    def batches(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """Batches (the group's share of each) from step `start_step` on."""
        pieces: list[np.ndarray] = []  # a batch that spans windows, gathered so far
        wanted = self.batch_size
        for rows, order in self._stream(start_step * self.batch_size):
            while len(order):
                take, order = order[:wanted], order[wanted:]
                pieces.append(rows[take])
                wanted -= len(take)
                if not wanted:
                    yield pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                    pieces, wanted = [], self.batch_size


def open_store(store_uri: str, sites: Sequence[int | Site]) -> tuple[StoreRows, dict]:
    """The rows of a finished store (its extract manifest must exist) for `sites`."""
    found = manifest.require(store_uri, "extract", "activation store")
    return StoreRows(store_uri, sites, found["parts"]), found


def describe_parts(records: Sequence[dict]) -> dict[str, object]:
    """Token count and mean row norm per site over all parts (for the manifest)."""
    rows = sum(int(r["rows"]) for r in records)
    labels = record_sites(records[0])
    norm_sums = np.sum([r["norm_sums"] for r in records], axis=0)
    return {
        "rows": rows,
        "mean_norm": {label: float(norm_sums[i] / max(rows, 1)) for i, label in enumerate(labels)},
    }


def read_part_record(store_uri: str, part: int) -> dict:
    uri = storage.join(part_uri(store_uri, part), PART_ROWS_NAME)
    if not storage.exists(uri):
        raise InputError(f"activation store part {uri} is unfinished")
    return storage.read_json(uri)
