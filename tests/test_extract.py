"""The extract stage and the model taps it rests on: truncated and multi-layer taps equal the
full model, the store holds exactly the activations the stream would give, and training reads
it."""

import json

import numpy as np
import pytest

from jobs.cli import main
from sae import sharding
from sae.data import activation_store, activations, token_shards
from sae.io import manifest
from sae.model import lm

from .conftest import reuse_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_batch(local_run):
    tokens = manifest.read(str(local_run / "tokens"))
    sequences = token_shards.iter_sequences(tokens["shards"]["train"])
    return next(activations.sequence_batches(sequences, 8))


def test_truncated_and_multi_layer_taps_equal_the_full_model(backbone, first_batch):
    import keras

    token_ids, lengths = first_batch
    mesh = sharding.make_mesh()
    # The full model, every block computed, with block 0's output exposed beside the end.
    full = keras.Model(
        backbone.input, [backbone.get_layer("decoder_block_0").output, backbone.output]
    )
    mask = np.arange(token_ids.shape[1])[None, :] < lengths[:, None]
    full_block0, _ = full({"token_ids": token_ids, "padding_mask": mask})
    truncated = lm.ActivationTap(backbone, [0], mesh)(token_ids, lengths)[0]
    np.testing.assert_allclose(truncated, np.asarray(full_block0), rtol=1e-5, atol=1e-5)

    both = lm.ActivationTap(backbone, [0, 1], mesh)(token_ids, lengths)
    alone = lm.ActivationTap(backbone, [1], mesh)(token_ids, lengths)[0]
    np.testing.assert_allclose(both[0], truncated, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], alone, rtol=1e-5, atol=1e-5)


def _args(local_run, workdir, *extra):
    return [
        *reuse_run(local_run, workdir),
        "extract.layers=[0, 1]",
        "extract.chunk_rows=512",
        "extract.lm_batch_size=8",
        *extra,
    ]


def test_store_holds_the_streamed_activations_and_trains(
    local_run, backbone, first_batch, tmp_path
):
    args = _args(local_run, tmp_path, "extract.dtype=float32", "train.source=store")
    assert main(["extract", *args]) == 0
    store = manifest.read(str(tmp_path / "activations"))
    tokens = manifest.read(str(tmp_path / "tokens"))
    # Every content token of the train split once: real tokens minus one BOS per document
    # start that landed in the train split (counted from the shards themselves).
    expected = 0
    for uri in tokens["shards"]["train"]:
        ids, lengths = token_shards.read_shard(uri)
        expected += int(activations.content_mask(ids, lengths, tokens["tokenizer"]["bos_id"]).sum())
    assert store["counts"]["tokens"] == expected
    assert store["sites"] == ["resid_post.0", "resid_post.1"] and store["d_model"] == 64
    assert set(store["mean_norm"]) == {"resid_post.0", "resid_post.1"}

    # The first rows are the first sequences' activations at both layers, side by side.
    token_ids, lengths = first_batch
    tap = lm.ActivationTap(backbone, [0, 1], sharding.make_mesh())
    streamed = np.concatenate(tap(token_ids, lengths), axis=-1)
    streamed = streamed[activations.content_mask(token_ids, lengths, tokens["tokenizer"]["bos_id"])]
    rows, _ = activation_store.open_store(str(tmp_path / "activations"), [0, 1])
    first = rows.chunks[:1]
    stored = rows.assemble(first, rows.read_chunks(first))
    assert len(stored) == 512 < len(streamed)
    np.testing.assert_allclose(stored, streamed[:512], rtol=1e-5, atol=1e-5)

    assert main(["train", *args]) == 0
    cfg = json.loads((tmp_path / "sae" / "topk-L1-x4-k16" / "cfg.json").read_text())
    assert cfg["activation_source"] == "store" and cfg["d_in"] == 64
    trained = manifest.read(str(tmp_path / "sae"))
    assert trained["inputs"] == {"activations": manifest.fingerprint(str(tmp_path / "activations"))}
    assert trained["counts"]["final_topk-L1-x4-k16/l0"] == 16


def test_training_from_a_store_without_the_layer_is_refused(local_run, tmp_path, capsys):
    args = _args(local_run, tmp_path, "extract.layers=[0]", "extract.max_rows=600")
    assert main(["extract", *args]) == 0
    assert manifest.read(str(tmp_path / "activations"))["counts"]["tokens"] == 600
    assert main(["train", *args, "train.source=store"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has resid_post.0, not resid_post.1: extract them first" in message
    assert not (tmp_path / "sae").exists()
