"""The extract stage across hosts: two CPU processes joined by jax.distributed write one store
whose parts hold their own shards' rows, equal to what one process extracts; and the pieces
that make this work (lockstep forwards, a tap in the model's compute dtype) on their own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jobs.cli import main
from sae.data import activation_store, activations, token_shards
from sae.io import manifest

from .conftest import _free_port, reuse_run

ROOT = Path(__file__).resolve().parents[1]
BF16_TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}


class _FakeHosts:
    """Hosts as threads sharing a fake tap: a forward returns the token ids as activations, and
    reading an `any_host` flag waits, as a collective does, until every host dispatched it."""

    def __init__(self, hosts: int) -> None:
        self.flags: list[list[bool]] = [[] for _ in range(hosts)]
        self.changed = threading.Condition()

    def tap(self, host: int) -> _FakeTap:
        return _FakeTap(self, host)

    def agreed(self, step: int) -> bool:
        with self.changed:
            dispatched = self.changed.wait_for(
                lambda: all(len(f) > step for f in self.flags), timeout=10
            )
            assert dispatched, f"step {step} never dispatched by every host: a real run hangs"
            return any(f[step] for f in self.flags)


class _FakeTap:
    def __init__(self, hosts: _FakeHosts, host: int) -> None:
        self.hosts, self.host = hosts, host

    def __call__(self, token_ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        return [token_ids[..., None].astype(np.float32)]

    def any_host(self, flag: bool) -> _Flag:
        with self.hosts.changed:
            self.hosts.flags[self.host].append(flag)
            self.hosts.changed.notify_all()
            return _Flag(self.hosts, len(self.hosts.flags[self.host]) - 1)


class _Flag:
    def __init__(self, hosts: _FakeHosts, step: int) -> None:
        self.hosts, self.step = hosts, step

    def __bool__(self) -> bool:
        return self.hosts.agreed(self.step)


def _sequences(first: int, count: int, length: int = 6) -> list[tuple[np.ndarray, int]]:
    return [(np.arange(length) + first + i * length, length) for i in range(count)]


def test_lockstep_hosts_run_equal_forwards_and_keep_their_own_rows():
    hosts = _FakeHosts(2)
    own = [_sequences(10, 3), _sequences(1000, 13)]  # 1 and 4 batches of 4 sequences

    def run(host: int) -> np.ndarray:
        chunks = activations.lockstep_chunks(iter(own[host]), hosts.tap(host), 4, 6, bos_id=-1)
        return np.concatenate(list(chunks))[:, 0]

    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(run, range(2)))
    forwards = len(hosts.flags[1])
    assert len(hosts.flags[0]) == forwards, "hosts ran different numbers of forwards"
    assert hosts.flags == [[True] + [False] * (forwards - 1), [True] * 4 + [False] * (forwards - 4)]
    assert forwards <= 6, "at most two empty forwards past the last real batch"
    for host, sequences in enumerate(own):
        np.testing.assert_array_equal(rows[host], np.concatenate([s for s, _ in sequences]))


def test_tap_returns_the_model_compute_dtype_and_consumers_cast_to_float32(tmp_path):
    import keras_hub

    from sae import sharding
    from sae.model import lm

    tokens = np.random.default_rng(0).integers(3, 50, size=(16, 16)).astype(np.int32)
    tokens[::3, 0] = 2  # BOS
    lengths = np.array([16, 12, 9, 16, 3, 16, 16, 1] * 2, np.int32)
    sequences = [(tokens[i], int(lengths[i])) for i in range(16)]
    for dtype, expected in (("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16)):
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=64,
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=16,
            intermediate_dim=32,
            head_dim=8,
            dtype=dtype,
        )
        tap = lm.ActivationTap(backbone, [0, 1], sharding.make_mesh())
        assert tap.dtype == expected
        assert all(np.asarray(out).dtype == expected for out in tap(tokens[:8], lengths[:8]))
        rows = np.concatenate(list(activations.activation_chunks(iter(sequences), tap, 8, 2)))
        content = int(activations.content_mask(tokens, lengths, 2).sum())
        assert rows.dtype == expected and rows.shape == (content, 32)

        # The store keeps them exactly in float32, with fp32 norms; the training buffer keeps
        # the tap's dtype (training casts to float32 on the device).
        part = activation_store.part_uri(str(tmp_path / dtype), 0)
        writer = activation_store.PartWriter(part, [0, 1], 16, len(rows), 8, "float32")
        writer.append(rows)
        record = writer.close()
        wide = rows.astype(np.float32)
        np.testing.assert_allclose(
            record["norm_sums"][1], np.linalg.norm(wide[:, 16:], axis=1).sum(), rtol=1e-5
        )
        stored = activation_store.StoreRows(str(tmp_path / dtype), [0, 1], [record])
        np.testing.assert_array_equal(
            stored.assemble(stored.chunks, stored.read_chunks(stored.chunks)), wide
        )
        buffer = activations.ShuffleBuffer(len(rows), 32, 0, tap.dtype)
        assert next(buffer.batches(iter([rows]), 4)).dtype == expected


def _extract_args(local_run, workdir: Path) -> list[str]:
    return [
        *reuse_run(local_run, workdir),
        "model.dtype=bfloat16",
        "extract.layers=[0, 1]",
        "extract.chunk_rows=512",
        "extract.lm_batch_size=8",
    ]


def _run_two_processes(args: list[str], logs: Path, timeout: float = 300) -> list[tuple[int, str]]:
    """`gemma-sae extract` as processes 0 and 1 of one jax.distributed runtime, 2 CPU devices
    each; (exit code, stderr) per process."""
    env = {
        **os.environ,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
        "JAX_NUM_PROCESSES": "2",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    logs.mkdir()
    procs = []
    for process in range(2):
        # stderr to files, not pipes: a full pipe would stall a host and the other with it.
        with open(logs / f"process-{process}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "jobs.cli", "extract", *args],
                    cwd=ROOT,
                    env={**env, "JAX_PROCESS_ID": str(process)},
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    deadline = time.monotonic() + timeout
    try:
        codes = [proc.wait(timeout=max(deadline - time.monotonic(), 1)) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:  # a hang (one host waiting on the other): don't leak it
                proc.kill()
                proc.wait()
    return [(code, (logs / f"process-{p}.log").read_text()) for p, code in enumerate(codes)]


def _all_rows(store: activation_store.StoreRows, part: int) -> np.ndarray:
    chunks = [c for c in store.chunks if c.part == part]
    return store.assemble(chunks, store.read_chunks(chunks))


@pytest.mark.slow
def test_two_processes_write_one_store_equal_to_a_single_process_extract(local_run, tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    results = _run_two_processes(_extract_args(local_run, multi), tmp_path / "logs")
    for process, (code, err) in enumerate(results):
        assert code == 0, f"process {process} failed:\n{err[-3000:]}"
    store_uri = str(multi / "activations")
    written = manifest.read(store_uri)
    # Process 0 alone wrote the manifest, after both parts were finished.
    assert f"done: {manifest.manifest_uri(store_uri)}" in results[0][1]
    assert "is written by process 0" in results[1][1]
    assert "done: " + manifest.manifest_uri(store_uri) not in results[1][1]
    records = [activation_store.read_part_record(store_uri, p) for p in range(2)]
    assert written["parts"] == records and written["counts"]["parts"] == 2
    assert written["counts"]["tokens"] == sum(r["rows"] for r in records)
    assert written["outputs"] == [activation_store.part_uri(store_uri, p) for p in range(2)]

    # Host p took train shard p (p::2 of two shards): its part holds that shard's content rows.
    tokens = manifest.read(str(multi / "tokens"))
    shards, bos = tokens["shards"]["train"], tokens["tokenizer"]["bos_id"]
    assert len(shards) == 2
    content = []
    for uri in shards:
        ids, lengths = token_shards.read_shard(uri)
        content.append(int(activations.content_mask(ids, lengths, bos).sum()))
    assert [r["rows"] for r in records] == content
    # Uneven shards: the host with fewer batches fed empty ones until the other was done.
    batches = [-(-token_shards.shard_counts(uri)[0] // 8) for uri in shards]
    assert batches[0] != batches[1]

    # One process over both shards reads them in order, so its rows are shard 0's then shard
    # 1's: the two parts, row for row (compared in order, since each host keeps shard order).
    assert main(["extract", *_extract_args(local_run, single)]) == 0
    reference, _ = activation_store.open_store(str(single / "activations"), [0, 1])
    expected = _all_rows(reference, 0)
    assert reference.num_rows == sum(content)
    parts, _ = activation_store.open_store(store_uri, [0, 1])
    np.testing.assert_allclose(_all_rows(parts, 0), expected[: content[0]], **BF16_TOLERANCE)
    np.testing.assert_allclose(_all_rows(parts, 1), expected[content[0] :], **BF16_TOLERANCE)
    norms = np.sum([r["norm_sums"] for r in records], axis=0)
    np.testing.assert_allclose(
        norms, manifest.read(str(single / "activations"))["parts"][0]["norm_sums"], rtol=1e-3
    )


def test_row_limit_shares_sum_to_max_rows_within_each_hosts_data():
    from sae.model.extract import _row_limit

    assert [_row_limit(601, 10**6, p, 2) for p in range(2)] == [301, 300]
    assert [_row_limit(601, 200, p, 2) for p in range(2)] == [200, 200]
    assert _row_limit(0, 1234, 1, 2) == 1234  # no limit: all the host's rows


def test_a_batch_the_hosts_devices_cannot_split_is_refused():
    from sae import sharding
    from sae.errors import ConfigError
    from sae.model.extract import _check_mesh

    with pytest.raises(ConfigError, match=r"lm_batch_size=6 \(sequences per host\) is not"):
        _check_mesh(sharding.make_mesh(4, 1), 6)
    _check_mesh(sharding.make_mesh(4, 1), 8)
