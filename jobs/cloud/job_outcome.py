"""What became of a job running on a TPU: the exit codes its workers leave in GCS (see
jobs/cloud/startup_script.py), the manifest its stage writes last, and the heartbeats that
tell a running worker from one whose VM died without an exit code."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from sae.config import PipelineConfig
from sae.errors import PREEMPTED_EXIT_CODE, StorageError
from sae.io import manifest, storage

_LOG_LINES = 12
# The startup script renews PREFIX/worker-N.alive this often (its HEARTBEAT_SECONDS)...
HEARTBEAT_SECONDS = 300
# ...and a worker without a beat for this long (or without any this long after its slice
# became ACTIVE) is lost: its VM died without an exit code (a host failure, a maintenance
# event), and waiting for it would last until the job's deadline.
LOST_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS


@dataclass(frozen=True)
class Outcome:
    kind: Literal["succeeded", "failed", "preempted"]
    message: str  # one line
    details: str = ""  # e.g. the end of a failed worker's log


def final_output(stage: str, config: PipelineConfig) -> tuple[str, str]:
    """Where a stage command's last manifest is written, and the stage name it records."""
    outputs = {
        "demo": (config.preset_uri, "demo-model"),
        "tokenize": (config.tokens_uri, "tokenize"),
        "extract": (config.activations_uri, "extract"),
        "train": (config.sae_uri, "train"),
        "report": (config.report_uri, "report"),
        "pipeline": (config.report_uri, "report"),
    }
    return outputs[stage]


class JobWatch:
    """Decides, from GCS alone, whether a submitted job has finished and how."""

    def __init__(self, output_uri: str, stage: str) -> None:
        self.output_uri = output_uri
        self.stage = stage
        # A manifest from an earlier run is not this job's outcome, unless the job says it
        # found its stage up to date (worker 0 exits 0 without writing a new one).
        self._before = manifest.read(output_uri)

    def check(
        self, status_uri: str, workers: int = 1, active_since: float | None = None
    ) -> Outcome | None:
        """The outcome, or None while the job is still running; given when the slice of
        `workers` hosts became ACTIVE (epoch seconds), a worker lost without an exit code
        ends the attempt as a preemption (the stage resumes on a new slice)."""
        exits = worker_exits(status_uri)
        for worker, code in sorted(exits.items()):
            if code not in (0, PREEMPTED_EXIT_CODE):
                log_uri = storage.join(status_uri, f"worker-{worker}.log")
                return Outcome(
                    "failed",
                    f"worker {worker} exited with code {code} (its log: {log_uri})",
                    _log_tail(log_uri),
                )
        stopped = [w for w, code in exits.items() if code == PREEMPTED_EXIT_CODE]
        if stopped:
            return Outcome("preempted", f"worker {min(stopped)} stopped on SIGTERM (exit 75)")
        found = manifest.read(self.output_uri)
        finished = found is not None and found.get("stage") == self.stage
        if finished and (found != self._before or exits.get(0) == 0):
            counts = ", ".join(f"{k}={v}" for k, v in sorted(found.get("counts", {}).items()))
            where = manifest.manifest_uri(self.output_uri)
            return Outcome("succeeded", f"{where}" + (f" ({counts})" if counts else ""))
        if exits.get(0) == 0:
            return Outcome(
                "failed",
                f"worker 0 exited with code 0 but no {self.stage} manifest is at "
                f"{manifest.manifest_uri(self.output_uri)}",
            )
        if active_since is not None:
            lost = lost_workers(status_uri, workers, exits, active_since)
            if lost:
                return Outcome(
                    "preempted",
                    f"worker {lost[0]} stopped reporting (no heartbeat for "
                    f"{LOST_AFTER_SECONDS} s): its VM is gone",
                )
        return None


def lost_workers(
    status_uri: str,
    workers: int,
    exits: dict[int, int],
    active_since: float,
    now: float | None = None,
) -> list[int]:
    """The workers without an exit code whose last heartbeat (or, without one, the slice's
    start) is older than LOST_AFTER_SECONDS."""
    now = time.time() if now is None else now
    lost = []
    for worker in range(workers):
        if worker in exits:
            continue
        uri = storage.join(status_uri, f"worker-{worker}.alive")
        try:
            text = storage.read_text(uri).strip() if storage.exists(uri) else ""
        except StorageError:
            continue  # a failed read is no evidence: look again at the next poll
        last = max(float(text) if text.isdigit() else 0.0, active_since)
        if now - last > LOST_AFTER_SECONDS:
            lost.append(worker)
    return lost


def worker_exits(status_uri: str) -> dict[int, int]:
    """Worker number -> exit code, for the workers whose job has ended."""
    exits = {}
    for uri in storage.glob(storage.join(status_uri, "worker-*.json")):
        status = storage.read_json(uri)
        exits[int(status["worker"])] = int(status["exit_code"])
    return exits


def _log_tail(log_uri: str) -> str:
    if not storage.exists(log_uri):
        return ""
    return "\n".join(storage.read_text(log_uri).rstrip().splitlines()[-_LOG_LINES:])
