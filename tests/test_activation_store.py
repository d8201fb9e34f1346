"""The activation store: zarr v3 arrays written through tensorstore, read back shuffled."""

import ml_dtypes
import numpy as np
import pytest

from sae.data import activation_store
from sae.errors import InputError
from sae.io import storage

D, LAYERS = 8, [1, 3]


def _write(uri: str, parts: list[np.ndarray], chunk_rows: int = 64, dtype: str = "float32"):
    records = []
    for index, rows in enumerate(parts):
        writer = activation_store.PartWriter(
            activation_store.part_uri(uri, index), LAYERS, D, len(rows) + 100, chunk_rows, dtype
        )
        for piece in np.array_split(rows, 7):  # uneven appends, as the model produces them
            writer.append(piece)
        records.append(writer.close())
    return activation_store.StoreRows(uri, LAYERS, records)


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D * len(LAYERS))).astype(np.float32)


def _ids(parts: list[np.ndarray]) -> np.ndarray:
    """Row i of all parts carries i in column 0, so reads can be matched to writes."""
    start = 0
    for rows in parts:
        rows[:, 0] = np.arange(start, start + len(rows))
        start += len(rows)
    return np.concatenate(parts)


def test_written_rows_read_back_per_layer(tmp_path):
    parts = [_rows(300, 0), _rows(130, 1)]
    every = _ids(parts)
    store = _write(str(tmp_path / "store"), parts)
    assert store.num_rows == 430 and store.dim == 2 * D
    # A chunk per 64 rows of each part; the last chunk of a part is short.
    assert [c.rows for c in store.chunks] == [64] * 4 + [44] + [64, 64, 2]
    read = store.assemble(store.chunks, store.read_chunks(store.chunks))
    np.testing.assert_array_equal(read, every)
    one_layer = activation_store.StoreRows(
        str(tmp_path / "store"),
        [3],
        [{"rows": 300, "layers": LAYERS}, {"rows": 130, "layers": LAYERS}],
    )
    np.testing.assert_array_equal(
        one_layer.assemble(one_layer.chunks, one_layer.read_chunks(one_layer.chunks)),
        every[:, D:],
    )


def test_one_epoch_of_batches_is_a_permutation_and_well_mixed(tmp_path):
    parts = [_rows(1000, 0), _rows(600, 1)]
    _ids(parts)
    store = _write(str(tmp_path / "store"), parts)
    reader = activation_store.ShuffledReader(store, batch_size=100, window_rows=256, seed=3)
    batches = reader.batches()
    ids = np.concatenate([next(batches)[:, 0] for _ in range(16)]).astype(int)
    assert sorted(ids) == list(range(1600))  # every row once: none lost, none repeated
    # Mixed: a batch spans several chunks, not a run of neighbouring rows.
    first = ids[:100]
    assert len(np.unique(first // 64)) >= 3 and np.any(np.diff(first) != 1)
    # The next epoch visits the rows again, in another order.
    second = np.concatenate([next(batches)[:, 0] for _ in range(16)]).astype(int)
    assert sorted(second) == list(range(1600)) and not np.array_equal(second, ids)


def test_reader_resumes_at_an_exact_step(tmp_path):
    store = _write(str(tmp_path / "store"), [_rows(700, 0), _rows(333, 1)])
    straight = activation_store.ShuffledReader(store, 96, 200, seed=5).batches()
    expected = [next(straight) for _ in range(25)]  # crosses an epoch boundary (1033 rows)
    for start in (0, 7, 10, 11, 20):
        resumed = activation_store.ShuffledReader(store, 96, 200, seed=5).batches(start)
        for step in range(start, 25):
            np.testing.assert_array_equal(next(resumed), expected[step])
    other = activation_store.ShuffledReader(store, 96, 200, seed=6).batches()
    assert not np.array_equal(next(other), expected[0])


def test_host_groups_each_read_their_own_chunks_and_together_every_row(tmp_path):
    parts = [_rows(700, 0), _rows(333, 1)]  # 17 chunks of up to 64 rows
    _ids(parts)
    uri = str(tmp_path / "store")
    _write(uri, parts)
    records = [{"rows": 700, "layers": LAYERS}, {"rows": 333, "layers": LAYERS}]
    window, share, groups = 96, 32, 3
    seen, straight = [], []
    for group in range(groups):
        store = activation_store.StoreRows(uri, LAYERS, records)  # its own read counter
        reader = activation_store.ShuffledReader(store, share, window, 5, group, groups)
        epoch_rows = sum(c.rows for c in reader._epoch_chunks(0))
        batches = reader.batches()
        taken = [next(batches) for _ in range(-(-epoch_rows // share))]
        seen.append(np.concatenate(taken)[:epoch_rows, 0].astype(int))
        straight.append(taken)
        # About a third of the store, plus at most two windows of lookahead (the one being
        # consumed and the next, fetched while it is): never the whole store.
        lookahead = 2 * reader.window_chunks * 64 * store.row_bytes
        assert store.bytes_read <= epoch_rows * store.row_bytes + lookahead
        assert epoch_rows <= 1.1 * store.num_rows / groups + 64
        # A group resumes at an exact step of its own stream.
        resumed = activation_store.ShuffledReader(store, share, window, 5, group, groups)
        np.testing.assert_array_equal(next(resumed.batches(3)), taken[3])
    every = np.concatenate(seen)
    assert sorted(every) == list(range(1033))  # each row once, by exactly one group
    assert not np.array_equal(straight[0][0], straight[1][0])


def test_bfloat16_store_keeps_bf16_precision(tmp_path):
    rows = _rows(200, 0) * 40
    store = _write(str(tmp_path / "store"), [rows], dtype="bfloat16")
    read = store.assemble(store.chunks, store.read_chunks(store.chunks))
    np.testing.assert_array_equal(read, rows.astype(ml_dtypes.bfloat16).astype(np.float32))
    # Two bytes a value on disk: 4 whole chunks of 64 rows per layer, uncompressed; none of
    # the capacity beyond the rows written is left behind.
    chunk_bytes = sum(p.stat().st_size for p in (tmp_path / "store").rglob("c/*/*"))
    assert chunk_bytes == len(LAYERS) * 4 * 64 * D * 2


def test_missing_layer_is_a_one_line_error(tmp_path):
    _write(str(tmp_path / "store"), [_rows(50, 0)])
    with pytest.raises(
        InputError, match=r"has resid_post.1, resid_post.3, not resid_post.2: extract them first"
    ):
        activation_store.StoreRows(str(tmp_path / "store"), [2], [{"rows": 50, "layers": LAYERS}])


def test_unfinished_store_is_refused(tmp_path):
    with pytest.raises(InputError, match="no finished activation store"):
        activation_store.open_store(str(tmp_path / "nothing"), LAYERS)


@pytest.mark.gcs
def test_store_on_gcs(gcs_bucket_uri):
    parts = [_rows(150, 0)]
    every = _ids(parts)
    uri = storage.join(gcs_bucket_uri, "store")
    store = _write(uri, parts, chunk_rows=32, dtype="bfloat16")
    assert storage.exists(storage.join(uri, "part-00000", "rows.json"))
    reader = activation_store.ShuffledReader(store, 50, 64, seed=0).batches()
    ids = np.concatenate([next(reader)[:, 0] for _ in range(3)]).astype(int)
    assert sorted(ids) == list(range(150))
    read = store.assemble(store.chunks, store.read_chunks(store.chunks))
    np.testing.assert_array_equal(read, every.astype(ml_dtypes.bfloat16).astype(np.float32))
