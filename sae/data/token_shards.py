"""The token-shard format: Parquet files of fixed-length packed sequences.

Columns: `token_ids` (fixed-size list of int32, padded with the tokenizer's pad id) and
`length` (the number of real tokens; the rest is padding). File metadata records the
sequence length and the count of real tokens, so a manifest can be checked without a scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae.errors import InputError
from sae.io import storage

SPLITS = ("train", "eval")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def write_shard(
    uri: str, rows: Sequence[np.ndarray], lengths: Sequence[int], sequence_length: int
) -> int:
    """Write one shard; returns its count of real tokens."""
    flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    token_ids = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), sequence_length)
    table = pa.table({"token_ids": token_ids, "length": pa.array(lengths, pa.int32())})
    num_tokens = int(sum(lengths))
    table = table.replace_schema_metadata(
        {
            "sequence_length": str(sequence_length),
            "num_tokens": str(num_tokens),
        }
    )
    with storage.open_write(uri) as handle:
        pq.write_table(table, handle, compression="zstd")
    return num_tokens


def shard_counts(uri: str) -> tuple[int, int]:
    """(sequences, real tokens) of one shard, from its Parquet footer alone (no data read)."""
    with storage.open_read(uri) as handle:
        meta = pq.read_metadata(handle)
    return meta.num_rows, int(meta.metadata[b"num_tokens"])


def read_shard(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids [n, sequence_length] int32, lengths [n] int32) of one shard."""
    try:
        with storage.open_read(uri) as handle:
            table = pq.read_table(handle)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"token shard {uri} is not a readable Parquet file: {error}") from None
    column = table.column("token_ids").combine_chunks()
    width = column.type.list_size
    tokens = column.values.to_numpy().reshape(-1, width).astype(np.int32)
    return tokens, table.column("length").to_numpy().astype(np.int32)


def iter_sequences(
    shards: Sequence[str], seed: int | None = None, epochs: int | None = 1, start: int = 0
) -> Iterator[tuple[np.ndarray, int]]:
    """Sequences of the given shards, shard order (and row order) shuffled per epoch if seeded.

    `epochs=None` repeats forever. Memory holds one shard at a time. `start` skips that many
    sequences of the stream (a resumed run's position): whole shards are passed over by their
    footers' row counts, not read, and the shuffles advance as if they had been."""
    epoch = 0
    while epochs is None or epoch < epochs:
        order = np.arange(len(shards))
        rng = np.random.default_rng(None if seed is None else [seed, epoch])
        if seed is not None:
            rng.shuffle(order)
        for index in order:
            if start and start >= (count := shard_counts(shards[index])[0]):
                if seed is not None:
                    rng.shuffle(np.arange(count))  # the same draws as reading it
                start -= count
                continue
            tokens, lengths = read_shard(shards[index])
            rows = np.arange(len(tokens))
            if seed is not None:
                rng.shuffle(rows)
            for row in rows[start:]:
                yield tokens[row], int(lengths[row])
            start = 0
        epoch += 1
