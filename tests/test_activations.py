"""The activation stream: masks, fixed-shape batches, and a shuffle buffer that loses nothing."""

import numpy as np

from sae.data.activations import ShuffleBuffer, activation_chunks, content_mask, sequence_batches


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
