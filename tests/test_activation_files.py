"""Training rows from .npy files: a seeded order computed per step, no replay needed."""

import re

import numpy as np
import pytest

from sae.data import activation_files
from sae.errors import InputError


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 4097])
def test_permute_is_a_bijection(size):
    rows = activation_files.permute(np.arange(size), size, seed=3)
    assert sorted(rows.tolist()) == list(range(size))


def test_order_depends_on_the_seed_and_mixes():
    a = activation_files.permute(np.arange(1000), 1000, seed=0)
    b = activation_files.permute(np.arange(1000), 1000, seed=1)
    assert not np.array_equal(a, b)
    # Neighbouring positions land far apart (rows of one sequence do not stay together).
    assert np.median(np.abs(np.diff(a))) > 100


def test_each_epoch_visits_every_row_once():
    rows = np.concatenate([activation_files.batch_rows(s, 10, 35, seed=0) for s in range(7)])
    for epoch in range(2):
        assert sorted(rows[epoch * 35 : (epoch + 1) * 35].tolist()) == list(range(35))
    assert not np.array_equal(rows[:35], rows[35:70])


def test_rows_span_files_and_resume_anywhere(tmp_path):
    data = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    np.save(tmp_path / "a.npy", data[:20])
    np.save(tmp_path / "b.npy", data[20:])
    uris = activation_files.find_activation_files(str(tmp_path / "*.npy"))
    source = activation_files.NpyRows(uris)
    assert (source.num_rows, source.dim) == (50, 4)
    straight = activation_files.random_batches(source, 8, seed=1)
    batches = [next(straight) for _ in range(9)]
    resumed = next(activation_files.random_batches(source, 8, seed=1, start_step=7))
    np.testing.assert_array_equal(resumed, batches[7])
    for batch in batches:
        # Every drawn row is a real row of the files.
        assert np.all(batch[:, 1] == batch[:, 0] + 1) and np.all(batch[:, 0] % 4 == 0)


def test_bad_activation_files(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10, np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((4, 3), np.int32))
    np.save(tmp_path / "wide.npy", np.zeros((4, 5), np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((4, 3), np.float32))
    (tmp_path / "text.npy").write_text("not numpy")
    cases = {
        "flat.npy": "expected [tokens, d_model]",
        "ints.npy": "expected floating-point rows",
        "text.npy": "not a readable .npy file",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            activation_files.NpyRows([str(tmp_path / name)])
    with pytest.raises(InputError, match="disagree on d_model"):
        activation_files.NpyRows([str(tmp_path / "ok.npy"), str(tmp_path / "wide.npy")])
    with pytest.raises(InputError, match="no activation files match"):
        activation_files.find_activation_files(str(tmp_path / "missing-*.npy"))
