"""The train stage across hosts: two CPU processes joined by jax.distributed train one set of
SAEs, from a store (each host its own chunks, about half the reads) and streaming (each host
its own shards, in lockstep); and the pieces that make this work on their own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jobs.cli import main
from sae.data import activations
from sae.io import manifest
from sae.training.step import agreed_stop

from .conftest import SMALL_SAES, _free_port, reuse_run

ROOT = Path(__file__).resolve().parents[1]
# Short runs: the learning rate warms up over 4 of them, losses are logged every 2.
STEPS = ["train.steps=24", "train.lr_warmup_steps=4", "train.log_every=2"]


class _FakeHosts:
    """Hosts as threads: `host_max` answers, as a collective does, once every host voted the
    same vote; each host's calls (forwards, votes, steps) are recorded in order."""

    def __init__(self, hosts: int) -> None:
        self.votes: list[list[int]] = [[] for _ in range(hosts)]
        self.events: list[list[str]] = [[] for _ in range(hosts)]
        self.changed = threading.Condition()

    def host_max(self, host: int):
        def vote(value: int) -> _Vote:
            with self.changed:
                self.votes[host].append(value)
                self.events[host].append("vote")
                self.changed.notify_all()
                return _Vote(self, len(self.votes[host]) - 1)

        return vote

    def tap(self, host: int):
        def forward(token_ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
            self.events[host].append("forward")
            return [token_ids[..., None].astype(np.float32)]

        return forward

    def agreed(self, index: int) -> int:
        with self.changed:
            voted = self.changed.wait_for(
                lambda: all(len(v) > index for v in self.votes), timeout=10
            )
            assert voted, f"vote {index} never cast by every host: a real run hangs"
            return max(v[index] for v in self.votes)


class _Vote:
    def __init__(self, hosts: _FakeHosts, index: int) -> None:
        self.hosts, self.index = hosts, index

    def __int__(self) -> int:
        return self.hosts.agreed(self.index)


def _sequences(first: int, count: int, lengths: list[int], length: int = 8):
    """Sequences of distinct token ids (so rows can be traced), BOS (1) at each start."""
    out = []
    for i in range(count):
        ids = np.arange(length, dtype=np.int32) + first + i * length
        ids[0] = 1
        out.append((ids, lengths[i % len(lengths)]))
    return out


def _alone(sequences, capacity: int, batch: int, seed: int, steps: int) -> list[np.ndarray]:
    """What one host would train on with a plain shuffle buffer over its own rows."""
    chunks = activations.activation_chunks(iter(sequences), lambda t, n: [t[..., None]], 4, 1)
    buffer = activations.ShuffleBuffer(capacity, 1, seed)
    batches = buffer.batches((c.astype(np.float32) for c in chunks), batch, drain=False)
    return [next(batches) for _ in range(steps)]


def _lockstep(hosts: _FakeHosts, host: int, sequences, capacity: int, batch: int, seed: int):
    buffer = activations.ShuffleBuffer(capacity, 1, seed)
    return activations.LockstepBatches(
        iter(sequences), hosts.tap(host), buffer, 4, batch, bos_id=1, host_max=hosts.host_max(host)
    )


def test_lockstep_hosts_run_the_same_forwards_and_each_trains_on_its_own_stream():
    # Host 0's sequences are full, host 1's mostly short: host 1 needs about 3x the forwards.
    own = [_sequences(1000, 400, [8]), _sequences(100_000, 1200, [3, 2, 8])]
    hosts, steps = _FakeHosts(2), 30

    def run(host: int) -> list[np.ndarray]:
        batches = _lockstep(hosts, host, own[host], 64, 16, seed=host)
        out = []
        for _ in range(steps):
            out.append(next(batches))
            hosts.events[host].append("step")
        return out

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(run, range(2)))
    assert hosts.events[0] == hosts.events[1], "hosts ran different programs"
    forwards = hosts.events[0].count("forward")
    needed = [len(_content(own[h], 64 + (steps - 1) * 16)) for h in range(2)]
    # Host 1 set the pace: its forwards, one kept in flight, and none wasted beyond that.
    assert needed[0] < needed[1] and forwards == needed[1] + 1
    for host in range(2):
        expected = _alone(own[host], 64, 16, host, steps)
        for step in range(steps):
            np.testing.assert_array_equal(got[host][step], expected[step])


def _content(sequences, rows: int) -> list[int]:
    """The model batches (of 4 sequences) one host needs for `rows` content rows."""
    counts, total = [], 0
    for start in range(0, len(sequences), 4):
        if total >= rows:
            break
        total += sum(length - 1 for _, length in sequences[start : start + 4])
        counts.append(total)
    return counts


def test_one_host_streams_the_batches_a_plain_shuffle_buffer_gives():
    sequences = _sequences(0, 300, [8, 5])
    batches = activations.LockstepBatches(
        iter(sequences),
        lambda t, n: [t[..., None]],
        activations.ShuffleBuffer(100, 1, 7),
        4,
        24,
        bos_id=1,
    )
    expected = _alone(sequences, 100, 24, 7, 20)
    for step in range(20):
        np.testing.assert_array_equal(next(batches), expected[step])


def test_when_one_hosts_sequences_run_out_all_hosts_stop_at_the_same_step():
    own = [_sequences(0, 200, [8]), _sequences(10_000, 30, [8])]  # 1400 vs 210 rows
    hosts = _FakeHosts(2)

    def run(host: int) -> int:
        steps = 0
        for _ in _lockstep(hosts, host, own[host], 64, 16, seed=0):
            steps += 1
            hosts.events[host].append("step")
        return steps

    with ThreadPoolExecutor(2) as pool:
        steps = list(pool.map(run, range(2)))
    # Host 1 fills (210 - 64) // 16 + 1 = 10 steps; host 0 runs empty forwards past its end.
    assert steps == [10, 10]
    assert hosts.events[0] == hosts.events[1]


def test_a_stop_asked_on_one_host_stops_every_host_at_the_same_step():
    hosts = _FakeHosts(2)
    asked = [7, 1000]  # SIGTERM reaches host 0 at step 7 and host 1 never

    def run(host: int) -> int:
        step = 0
        should_stop = agreed_stop(lambda: step >= asked[host], hosts.host_max(host), lag=2)
        while True:
            step += 1
            if should_stop():
                return step

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(run, range(2))) == [9, 9]


def _launch(args: list[str], logs: Path, port: int) -> list[subprocess.Popen]:
    """`gemma-sae train` as processes 0 and 1 of one jax.distributed runtime, 2 CPU devices
    each, stderr to logs/process-<p>.log (a file: a full pipe would stall both hosts)."""
    env = {
        **os.environ,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    logs.mkdir(parents=True)
    procs = []
    for process in range(2):
        with open(logs / f"process-{process}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "jobs.cli", "train", *args],
                    cwd=ROOT,
                    env={**env, "JAX_PROCESS_ID": str(process)},
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    return procs


def _wait(procs: list[subprocess.Popen], logs: Path, timeout: float = 240) -> list[tuple[int, str]]:
    """Each process's stderr, once both exited; a hang (a host waiting on the other) fails."""
    deadline = time.monotonic() + timeout
    try:
        codes = [proc.wait(timeout=max(deadline - time.monotonic(), 1)) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [
        (code, (logs / f"process-{process}.log").read_text()) for process, code in enumerate(codes)
    ]


def _wait_for_line(path: Path, text: str, procs: list[subprocess.Popen], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert all(p.poll() is None for p in procs), f"exited early:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


def _weights(sae_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {name: load_file(sae_dir / name / "sae_weights.safetensors") for name in SMALL_SAES}


def _losses(sae_dir: Path, name: str) -> list[float]:
    lines = (sae_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[f"{name}/loss"] for line in lines]


def _store_reads(err: str) -> tuple[float, float]:
    """(MiB read by the host, MiB in the store) from a host's log."""
    match = re.search(r"this host read ([\d.]+) MiB of the activation store's ([\d.]+) MiB", err)
    assert match, err[-3000:]
    return float(match[1]), float(match[2])


@pytest.mark.slow
def test_two_hosts_read_half_a_store_each_and_resume_after_a_stop_on_one(local_run, tmp_path):
    # 4096 rows of 64 float32 (1 MiB) in chunks of 128; 24 steps of 256 rows: 1.5 epochs.
    extract = ["extract.layers=[1]", "extract.chunk_rows=128", "extract.dtype=float32"]
    extract.append("extract.max_rows=4096")
    assert main(["extract", *reuse_run(local_run, tmp_path / "data"), *extract]) == 0
    # A 2 x 2 mesh: the batch split over the hosts, latents over each host's two devices.
    common = [
        *STEPS,
        "train.source=store",
        f"train.activations={tmp_path / 'data' / 'activations'}",
        "train.mesh_data=2",
        "train.mesh_model=2",
        "train.checkpoint_every=4",
        "train.shuffle_buffer=512",  # 256 rows (two chunks) per host
    ]

    # Straight through: each host reads its own chunks, about half of what training needs.
    logs = tmp_path / "straight"
    straight = _wait(
        _launch([*reuse_run(local_run, tmp_path / "straight-run"), *common], logs, _free_port()),
        logs,
    )
    for process, (code, err) in enumerate(straight):
        assert code == 0, f"process {process} failed:\n{err[-3000:]}"
        read, store = _store_reads(err)
        assert store == 1.0
        # Its half of 1.5 epochs (0.75 MiB), plus at most two windows of lookahead
        # (0.125 MiB): every host reading the whole stream would read 1.5 MiB or more.
        assert 0.75 <= read <= 0.75 + 0.125, read

    # SIGTERM reaches host 1 alone: both hosts stop at one step, checkpoint and exit 75...
    multi = [*reuse_run(local_run, tmp_path / "multi"), *common]
    port, logs = _free_port(), tmp_path / "stopped"
    procs = _launch(multi, logs, port)
    _wait_for_line(logs / "process-1.log", "checkpoint saved at step 4", procs)
    procs[1].send_signal(signal.SIGTERM)
    stopped = _wait(procs, logs)
    assert [code for code, _ in stopped] == [75, 75], stopped[0][1][-3000:] + stopped[1][1][-3000:]
    messages = [err.strip().splitlines()[-1] for _, err in stopped]
    assert messages[0] == messages[1] and "preempted: stopped at step" in messages[0]
    assert manifest.read(str(tmp_path / "multi" / "sae")) is None

    # ...and both resume from it to the end, with the weights of the run never stopped.
    logs = tmp_path / "resumed"
    resumed = _wait(_launch(multi, logs, _free_port()), logs)
    for process, (code, err) in enumerate(resumed):
        assert code == 0, f"process {process} failed:\n{err[-3000:]}"
        assert "resumed from the checkpoint at step" in err
    one, two = _weights(tmp_path / "straight-run" / "sae"), _weights(tmp_path / "multi" / "sae")
    for name in SMALL_SAES:
        for key, value in one[name].items():
            np.testing.assert_allclose(two[name][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_hosts_stream_their_own_shards_in_lockstep(local_run, tmp_path):
    args = [*reuse_run(local_run, tmp_path), *STEPS, "train.checkpoint_every=12"]
    tokens = manifest.read(str(tmp_path / "tokens"))
    assert len(tokens["shards"]["train"]) == 2  # one each
    logs = tmp_path / "logs"
    results = _wait(_launch(args, logs, _free_port()), logs)
    for process, (code, err) in enumerate(results):
        assert code == 0, f"process {process} failed:\n{err[-3000:]}"
    sae_dir = tmp_path / "sae"
    # Process 0 alone wrote the manifest and the SAEs; both saved the checkpoints.
    assert "done: " + manifest.manifest_uri(str(sae_dir)) in results[0][1]
    assert "is written by process 0" in results[1][1]
    trained = manifest.read(str(sae_dir))
    assert trained["counts"]["tokens"] == 24 * 256
    assert sorted(p.name for p in (sae_dir / "checkpoints").iterdir()) == ["12", "24"]
    for name, weights in _weights(sae_dir).items():
        assert all(np.isfinite(w).all() for w in weights.values()), name
        losses = _losses(sae_dir, name)
        assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], (name, losses)
