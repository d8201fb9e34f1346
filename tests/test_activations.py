"""The activation stream: masks, fixed-shape batches, and a shuffle buffer that loses nothing."""

import itertools

import ml_dtypes
import numpy as np

from sae.data import token_shards
from sae.data.activations import (
    ShuffleBuffer,
    StreamPosition,
    activation_chunks,
    content_mask,
    sequence_batches,
    training_batches,
)


def test_content_mask_drops_bos_and_padding():
    tokens = np.array([[2, 5, 6, 0], [2, 7, 0, 0]])
    mask = content_mask(tokens, np.array([3, 2]), bos_id=2)
    assert mask.tolist() == [[False, True, True, False], [False, True, False, False]]


def test_sequence_batches_pad_the_last_batch_with_empty_rows():
    sequences = [(np.full(4, i, np.int32), 4) for i in range(5)]
    batches = list(sequence_batches(iter(sequences), batch_size=2))
    assert [b[0].shape for b in batches] == [(2, 4)] * 3
    assert batches[-1][1].tolist() == [4, 0]


def test_shuffle_buffer_is_a_permutation():
    rows = np.arange(1000, dtype=np.float32)[:, None].repeat(3, axis=1)
    chunks = (rows[i : i + 37] for i in range(0, 1000, 37))
    out = np.concatenate(list(ShuffleBuffer(128, 3, seed=0).batches(chunks, 50)))
    assert len(out) == 1000
    assert sorted(out[:, 0].tolist()) == list(range(1000))
    assert (out[:, 0] == out[:, 2]).all(), "rows must stay intact"
    assert not np.array_equal(out[:, 0], np.arange(1000)), "order must be mixed"


def test_shuffle_buffer_is_reproducible_and_mixes_distant_rows():
    def run(seed):
        rows = np.arange(4096, dtype=np.float32)[:, None]
        chunks = (rows[i : i + 64] for i in range(0, 4096, 64))
        return np.concatenate(list(ShuffleBuffer(1024, 1, seed).batches(chunks, 256)))[:, 0]

    first, again, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # The first batch already draws from the whole buffer, not just the latest chunk.
    assert first[:256].max() - first[:256].min() > 512


def test_activation_chunks_keep_only_content_positions():
    def tap(token_ids, lengths):
        return [np.repeat(token_ids[..., None].astype(np.float32), 2, axis=-1)]

    sequences = iter([(np.array([2, 10, 11, 0], np.int32), 3), (np.array([2, 12, 0, 0]), 2)])
    rows = np.concatenate(list(activation_chunks(sequences, tap, lm_batch_size=4, bos_id=2)))
    assert rows[:, 0].tolist() == [10, 11, 12]


def _shards(tmp_path, count: int = 3, rows: int = 23, length: int = 12) -> list[str]:
    """Token shards whose tokens encode (shard, row, position), lengths varying."""
    rng = np.random.default_rng(0)
    uris = []
    for shard in range(count):
        sequences, lengths = [], []
        for row in range(rows):
            n = int(rng.integers(3, length + 1))
            ids = np.zeros(length, np.int32)
            ids[0] = 1  # BOS
            ids[1:n] = 1000 * shard + 10 * row + np.arange(1, n) + 2
            sequences.append(ids)
            lengths.append(n)
        uri = str(tmp_path / token_shards.shard_name("train", shard))
        token_shards.write_shard(uri, sequences, lengths, length)
        uris.append(uri)
    return uris


class CountingTap:
    """A stand-in for the model: each token's row is a function of its id; counts forwards."""

    def __init__(self) -> None:
        self.forwards = 0

    def __call__(self, token_ids, lengths):
        self.forwards += 1
        ids = token_ids[..., None].astype(np.float32)
        return [np.concatenate([ids, np.sin(ids), np.cos(ids)], axis=-1)]


def _stream(shards, tap, resume=None):
    return training_batches(
        shards,
        tap,
        3,
        lm_batch_size=4,
        batch_size=16,
        buffer_rows=64,
        bos_id=1,
        seed=3,
        resume=resume,
    )


def test_iter_sequences_starts_anywhere_without_reading_skipped_shards(tmp_path):
    shards = _shards(tmp_path)
    straight = list(itertools.islice(token_shards.iter_sequences(shards, 5, None), 150))
    for start in (0, 7, 23, 46, 69, 100):
        later = token_shards.iter_sequences(shards, 5, None, start=start)
        for (want, want_n), (got, got_n) in zip(straight[start:], later, strict=False):
            np.testing.assert_array_equal(got, want)
            assert got_n == want_n


def test_a_stream_resumed_from_its_position_continues_exactly_without_the_model(tmp_path):
    """Over several epochs of the shards: the batches after a resume at step 9 are those of a
    straight run, and getting back to step 9 ran no forward (the forwards after it are only
    those the new batches need)."""
    shards = _shards(tmp_path)
    straight_tap = CountingTap()
    straight = list(itertools.islice(_stream(shards, straight_tap), 40))

    first = CountingTap()
    stream = _stream(shards, first)
    head = list(itertools.islice(stream, 9))
    position = StreamPosition.from_bytes(stream.position().to_bytes())
    resumed_tap = CountingTap()
    resumed = _stream(shards, resumed_tap, resume=position)
    tail = list(itertools.islice(resumed, 31))
    for step, (got, want) in enumerate(zip(head + tail, straight, strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
    # Together, no more forwards than the straight run plus the ones in flight at the save.
    assert first.forwards + resumed_tap.forwards <= straight_tap.forwards + 2
    assert resumed_tap.forwards < straight_tap.forwards - first.forwards + 3


class Bfloat16Tap(CountingTap):
    """The counting tap as a bfloat16 model's: it says so, and its rows are bfloat16."""

    dtype = np.dtype(ml_dtypes.bfloat16)

    def __call__(self, token_ids, lengths):
        return [out.astype(ml_dtypes.bfloat16) for out in super().__call__(token_ids, lengths)]


def test_a_bfloat16_model_streams_bfloat16_batches(tmp_path):
    """Half the host memory and host-to-device bytes, the same values: the batches of a
    bfloat16 tap are the float32 stream's rounded to bfloat16, in the same order, and the
    position a checkpoint saves keeps them bit for bit."""
    shards = _shards(tmp_path)
    wide = list(itertools.islice(_stream(shards, CountingTap()), 12))
    stream = _stream(shards, Bfloat16Tap())
    narrow = list(itertools.islice(stream, 12))
    assert all(batch.dtype == ml_dtypes.bfloat16 for batch in narrow)
    for got, want in zip(narrow, wide, strict=True):
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))
    position = StreamPosition.from_bytes(stream.position().to_bytes())
    assert position.buffer_rows.dtype == ml_dtypes.bfloat16
    resumed = _stream(shards, Bfloat16Tap(), resume=position)
    np.testing.assert_array_equal(next(resumed), next(stream))
