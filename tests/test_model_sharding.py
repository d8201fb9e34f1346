"""Models larger than one chip: the language model's weights split over the mesh's model axis
(model.mesh_model) hold 1/model of the bytes per device and give the replicated model's
activations and spliced losses, in the tap, the spliced evaluation and the extract stage."""

import re

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jobs.cli import main
from sae import sharding
from sae.arch.spec import Site
from sae.data import activation_store, activations, token_shards
from sae.io import manifest
from sae.model import lm, spliced

from .conftest import reuse_run

pytestmark = pytest.mark.slow

MODEL_AXIS = 4


@pytest.fixture(scope="module")
def batch(tokens):
    sequences = token_shards.iter_sequences(tokens["shards"]["eval"])
    return next(activations.sequence_batches(sequences, 8))


def test_weight_sharding_splits_the_largest_divisible_dimension():
    mesh = sharding.make_mesh(2, MODEL_AXIS)
    assert sharding.weight_sharding((512, 64), mesh).spec == P("model", None)
    assert sharding.weight_sharding((64, 256), mesh).spec == P(None, "model")
    assert sharding.weight_sharding((6, 5), mesh).spec == P()  # nothing divides: replicated
    assert sharding.weight_sharding((512, 64), sharding.make_mesh(8, 1)).spec == P()


@pytest.mark.parametrize("sites", [[1], [Site(1, "mlp_in"), Site(1, "mlp_out")]])
def test_a_sharded_tap_holds_a_quarter_of_the_weights_and_reads_the_same(backbone, batch, sites):
    token_ids, lengths = batch
    replicated = lm.ActivationTap(backbone, sites, sharding.make_mesh(8, 1))
    split = lm.ActivationTap(backbone, sites, sharding.make_mesh(2, MODEL_AXIS))
    total = replicated.weight_bytes
    assert total == split.weight_bytes and replicated.weight_bytes_per_device == total
    # Every weight of the tiny model has a dimension 4 divides: exactly a quarter.
    assert split.weight_bytes_per_device == total // MODEL_AXIS
    for a, b in zip(replicated(token_ids, lengths), split(token_ids, lengths), strict=True):
        # The same computation up to the order of the sums XLA splits across devices.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_a_sharded_model_gives_the_same_spliced_losses(backbone, tokens, batch):
    bos = tokens["tokenizer"]["bos_id"]
    half = spliced.SplicedModel(lambda p, x: x * p["scale"], {"scale": np.float32(0.5)})
    sums = [
        spliced.SplicedLoss(backbone, 1, [half], mesh, bos)(*batch)
        for mesh in (sharding.make_mesh(8, 1), sharding.make_mesh(2, MODEL_AXIS))
    ]
    assert sums[0].positions == sums[1].positions > 0
    np.testing.assert_allclose(sums[1].ce, sums[0].ce, rtol=1e-5)
    np.testing.assert_allclose(sums[1].kl, sums[0].kl, rtol=1e-4, atol=1e-4)


def test_extract_with_a_sharded_model_stores_the_same_rows(local_run, tmp_path, capsys):
    common = ["extract.layers=[1]", "extract.dtype=float32", "extract.max_rows=1024"]
    stores = {}
    for axis in (1, MODEL_AXIS):
        workdir = tmp_path / f"model-axis-{axis}"
        args = [*reuse_run(local_run, workdir), *common, f"model.mesh_model={axis}"]
        assert main(["extract", *args]) == 0
        rows, _ = activation_store.open_store(str(workdir / "activations"), [1])
        stores[axis] = rows.assemble(rows.chunks, rows.read_chunks(rows.chunks))
    printed = capsys.readouterr().err
    found = re.findall(
        r"model weights ([\d.]+) MiB per device \(of ([\d.]+) MiB\) on mesh (.*)", printed
    )
    (whole, total, mesh_1), (quarter, total_4, mesh_4) = found
    assert whole == total == total_4 and mesh_1 == "{'data': 8, 'model': 1}"
    assert float(quarter) == pytest.approx(float(total) / MODEL_AXIS, abs=0.01)
    assert mesh_4 == "{'data': 2, 'model': 4}"
    assert stores[1].shape == (1024, 64)
    np.testing.assert_allclose(stores[MODEL_AXIS], stores[1], rtol=1e-5, atol=1e-5)


def test_streaming_with_a_sharded_model_needs_the_same_model_axis(local_run, tmp_path, capsys):
    args = [*reuse_run(local_run, tmp_path), "model.mesh_model=4", "train.mesh_model=2"]
    assert main(["train", *args]) == 2
    assert "train.mesh_model (2) must equal it" in capsys.readouterr().err


def test_streaming_trains_with_the_model_split_over_the_sae_model_axis(local_run, tmp_path, capsys):
    args = [*reuse_run(local_run, tmp_path), "model.mesh_model=2", "train.mesh_model=2"]
    assert main(["train", *args, "train.steps=10", "train.lr_warmup_steps=2"]) == 0
    printed = capsys.readouterr().err
    assert re.search(r"streaming: model weights [\d.]+ MiB per device .* 'model': 2\}", printed)
    trained = manifest.read(str(tmp_path / "sae"))
    assert all(np.isfinite(v) for k, v in trained["counts"].items() if k.endswith("/loss"))
