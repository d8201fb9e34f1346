"""`gemma-sae submit`: run a stage on a Cloud TPU slice and wait for its outcome.

    gemma-sae submit --project my-project --zone us-west4-a --tpu-name sae-l12 --spot \\
      --image us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae:latest \\
      --config configs/gemma2-2b-v5e-8.yaml --workdir gs://my-bucket/runs/l12 \\
      --stage pipeline train.steps=20000

Creates a queued resource whose node runs the startup script (jobs/cloud/startup_script.py renders
jobs/cloud/templates/tpu_startup.sh.tftpl) on every worker: the container with the stage, the
config and the overrides. Reports each state change and, once the slice is ACTIVE, watches
GCS for the outcome: the stage's manifest, or a worker's non-zero exit code. It deletes the
TPU when the job ends, fails, times out or is interrupted (unless --keep). A preempted slice
(spot), or a worker that exits 75, is deleted and created again, up to --retries times; the
train stage resumes from its last checkpoint in the workdir. The image tag is resolved to its
digest first (jobs/cloud/image_digest.py), so every attempt runs the same image.
`--dry-run` prints the equivalent gcloud commands instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from jobs.cli import STAGES
from jobs.cloud import gcloud_commands, image_digest, startup_script
from jobs.cloud.job_outcome import JobWatch, Outcome, final_output
from jobs.cloud.tpu_queue import NodeRequest, TpuError, TpuQueue
from sae import config as sae_config
from sae.errors import ConfigError, InputError, Preempted, SaeError
from sae.io import storage
from sae.progress import log

_ACCELERATOR = re.compile(r"v5litepod-(1|4|8|16|32|64|128|256)")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"([a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_RUNTIME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# The startup script authenticates docker with the VM's service account, which only
# Artifact Registry and Container Registry accept.
_IMAGE = re.compile(r"([a-z0-9-]+-docker\.pkg\.dev|([a-z]+\.)?gcr\.io)/[a-z0-9][^\s]*")
_SERVICE_ACCOUNT = re.compile(r"[a-z0-9._-]+@[a-z0-9.-]+\.gserviceaccount\.com")
# Config keys that name inputs: a TPU VM reads them from GCS, never from this machine.
_INPUT_KEYS = ("model.preset", "tokenize.input", "tokenize.tokenizer", "train.activations")
_SUSPENDED = ("SUSPENDING", "SUSPENDED")
# How long a preempted slice may take to disappear before it is created again.
_DELETE_WAIT_S = 900.0


class JobFailed(SaeError):
    """The TPU could not be provisioned, or the job on it failed or timed out."""


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated submission: the TPU to ask for and what runs on it."""

    request: NodeRequest  # its startup script is filled in per attempt
    image: str
    stage: str
    overrides: list[str]  # key=value words, then flags
    config: str  # a gs:// URI, or empty
    config_yaml: str | None  # a local config file's text, sent in the script
    workdir: str
    output_uri: str
    manifest_stage: str

    def status_uri(self, attempt_id: str) -> str:
        return storage.join(self.workdir, "submissions", self.request.name, attempt_id)

    def attempt(self, attempt_id: str) -> NodeRequest:
        script = startup_script.render(
            self.image,
            self.stage,
            self.workdir,
            self.status_uri(attempt_id),
            self.overrides,
            self.config,
            self.config_yaml,
        )
        return dataclasses.replace(self.request, startup_script=script)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae submit",
        description="Run a stage on a Cloud TPU v5e slice (a queued resource) and wait for it.",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--project", required=True, help="Google Cloud project ID")
    parser.add_argument("--zone", required=True, help="a zone with TPU v5e, e.g. us-west4-a")
    parser.add_argument("--tpu-name", required=True, help="queued resource and node name")
    parser.add_argument("--accelerator-type", default="v5litepod-8", help="v5litepod-N")
    parser.add_argument("--runtime-version", default="v2-alpha-tpuv5-lite")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    capacity.add_argument(
        "--reserved", action="store_true", help="any reservation of the project in the zone"
    )
    capacity.add_argument("--reservation", metavar="NAME", help="a named reservation")
    parser.add_argument(
        "--image", required=True, help="the TPU image, REGION-docker.pkg.dev/PROJECT/REPO/NAME:TAG"
    )
    parser.add_argument(
        "--service-account",
        required=True,
        help="the TPU VMs' service account (required: without one they would run as the "
        "Compute Engine default account, with whatever it may do in the project)",
    )
    parser.add_argument("--network", default="", help="VPC network (default: default)")
    parser.add_argument("--subnetwork", default="")
    parser.add_argument(
        "--external-ips",
        action="store_true",
        help="give the workers external IPs (default: internal only; the subnetwork needs "
        "Private Google Access)",
    )
    parser.add_argument("--stage", choices=STAGES, default="pipeline")
    parser.add_argument("--config", help="YAML config: a local file (sent along) or gs://")
    parser.add_argument("--workdir", required=True, help="gs:// working directory of the run")
    parser.add_argument("--force", action="store_true", help="run stages even when up to date")
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands")
    parser.add_argument(
        "--script-out", help="with --dry-run: where to write the startup script (default: temp)"
    )
    parser.add_argument("--keep", action="store_true", help="do not delete the TPU at the end")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument("--timeout-minutes", type=float, default=0.0, help="0: no limit")
    parser.add_argument("--retries", type=int, default=3, help="resubmissions after preemption")
    return parser


def _check(pattern: re.Pattern[str], value: str, flag: str, example: str) -> None:
    if not pattern.fullmatch(value):
        raise InputError(f"{flag}={value!r} is not valid (expected e.g. {example})")


def _validate(args: argparse.Namespace) -> None:
    _check(_PROJECT, args.project, "--project", "my-project")
    _check(_ZONE, args.zone, "--zone", "us-west4-a")
    _check(_TPU_NAME, args.tpu_name, "--tpu-name", "sae-run-1: lowercase, digits, hyphens")
    _check(_ACCELERATOR, args.accelerator_type, "--accelerator-type", "v5litepod-8 (1/4/8/.../256)")
    _check(_RUNTIME, args.runtime_version, "--runtime-version", "v2-alpha-tpuv5-lite")
    _check(_IMAGE, args.image, "--image", "us-west4-docker.pkg.dev/my-project/gemma-sae/app:tag")
    _check(
        _SERVICE_ACCOUNT,
        args.service_account,
        "--service-account",
        "sae-tpu@my-project.iam.gserviceaccount.com",
    )
    if args.reservation is not None:
        _check(_TPU_NAME, args.reservation, "--reservation", "my-reservation")
    if not storage.is_gcs(args.workdir) or len(args.workdir.rstrip("/")) <= len("gs://"):
        raise InputError(
            f"--workdir must be a gs:// URI (a TPU VM writes it), got {args.workdir!r}"
        )
    if args.retries < 0 or args.poll_seconds <= 0 or args.timeout_minutes < 0:
        raise InputError("--retries and --timeout-minutes must be >= 0, --poll-seconds > 0")
    for override in args.overrides:
        if "=" not in override:
            raise InputError(f"override {override!r} is not key=value")
        if override.split("=", 1)[0].strip() == "workdir":
            raise InputError("give the working directory with --workdir, not workdir=")


def _check_inputs_on_gcs(config: sae_config.PipelineConfig) -> None:
    raw = sae_config.to_dict(config)
    for key in _INPUT_KEYS:
        section, name = key.split(".")
        for uri in str(raw[section][name]).split(","):
            if uri.strip() and not storage.is_gcs(uri.strip()):
                raise ConfigError(f"{key}={uri.strip()!r} must be a gs:// URI for a TPU job")


def _job(args: argparse.Namespace) -> Job:
    _validate(args)
    workdir = args.workdir.rstrip("/")
    overrides = [*args.overrides, f"workdir={workdir}"]
    config = sae_config.load(args.config, overrides)
    _check_inputs_on_gcs(config)
    remote_config, config_yaml = "", None
    if args.config and storage.is_gcs(args.config):
        remote_config = args.config
    elif args.config:
        # The TPU VM cannot read this machine's files: the script carries the config.
        config_yaml = storage.read_text(args.config)
    output_uri, manifest_stage = final_output(args.stage, config)
    reserved = args.reserved or args.reservation is not None
    request = NodeRequest(
        project=args.project,
        zone=args.zone,
        name=args.tpu_name,
        accelerator_type=args.accelerator_type,
        runtime_version=args.runtime_version,
        startup_script="",
        provisioning="spot" if args.spot else "reserved" if reserved else "on-demand",
        reservation=args.reservation or "",
        service_account=args.service_account,
        network=args.network,
        subnetwork=args.subnetwork,
        external_ips=args.external_ips,
    )
    job = Job(
        request,
        args.image,
        args.stage,
        [*args.overrides, *(["--force"] if args.force else [])],
        remote_config,
        config_yaml,
        workdir,
        output_uri,
        manifest_stage,
    )
    job.attempt(_attempt_id(0))  # a value the startup script cannot carry stops here
    return job


def _attempt_id(attempt: int) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{attempt}"


def _print_commands(job: Job, script_out: str | None) -> None:
    attempt_id = _attempt_id(1)
    request = job.attempt(attempt_id)
    path = Path(script_out or Path(tempfile.mkdtemp(prefix="gemma-sae-submit-")) / "startup.sh")
    path.write_text(request.startup_script)
    commands = gcloud_commands.submission(
        request,
        str(path),
        worker_status=storage.join(job.status_uri(attempt_id), "worker-0.json"),
        manifest=storage.join(job.output_uri, "manifest.json"),
        workdir=job.workdir,
    )
    sys.stdout.write(gcloud_commands.render(commands))


def _pause(seconds: float) -> None:
    time.sleep(seconds)


class _Clock:
    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self.start = time.monotonic()
        self.end = self.start + minutes * 60 if minutes else None

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _follow(
    queue: TpuQueue,
    request: NodeRequest,
    watch: JobWatch,
    status_uri: str,
    clock: _Clock,
    poll_seconds: float,
) -> Outcome:
    """Poll the queued resource, then the job, until one of them has an outcome."""
    last, active_since = None, 0.0
    while True:
        state = queue.state(request)
        label = state.state if state else "DELETED"
        if label != last:
            detail = f" ({state.detail})" if state and state.detail else ""
            if state and state.state in _SUSPENDED and state.initiator:
                detail = f" (by {state.initiator.lower()})"
            log("submit", f"{request.name}: {label}{detail} after {clock.elapsed()}")
            if label == "ACTIVE":
                log("submit", "the job's log: " + shlex.join(gcloud_commands.follow_logs(request)))
            last = label
        if state is None:
            return Outcome("failed", f"the queued resource {request.name} was deleted")
        if state.state == "FAILED":
            return Outcome("failed", f"the TPU could not be provisioned: {state.detail}")
        if state.state in _SUSPENDED:
            # The service suspends a slice it preempts; a user's suspension is a stop.
            kind = "failed" if state.initiator == "USER" else "preempted"
            by = f" by {state.initiator.lower()}" if state.initiator else ""
            return Outcome(kind, f"the TPU was suspended{by}")
        if state.state == "ACTIVE":
            active_since = active_since or time.time()
            node = queue.node_state(request)
            if node in ("PREEMPTED", "TERMINATED"):
                return Outcome("preempted", f"the node is {node}")
            outcome = watch.check(status_uri, _hosts(request.accelerator_type), active_since)
            if outcome is not None:
                return outcome
        if clock.expired():
            return Outcome(
                "failed", f"no outcome within {clock.minutes:g} minutes (last state {label})"
            )
        _pause(poll_seconds)


def _hosts(accelerator_type: str) -> int:
    """Hosts (workers) of a v5e slice: 8 chips each, one for the smaller slices."""
    return max(1, int(accelerator_type.rsplit("-", 1)[1]) // 8)


def _delete(queue: TpuQueue, request: NodeRequest) -> None:
    log("submit", f"deleting {request.name}")
    try:
        queue.delete(request)
    except TpuError as error:
        # Never hide the job's own outcome behind this; say how to finish the cleanup.
        log("submit", f"{error}; delete it with: " + shlex.join(gcloud_commands.delete(request)))


def _wait_gone(queue: TpuQueue, request: NodeRequest, poll_seconds: float) -> None:
    deadline = time.monotonic() + _DELETE_WAIT_S
    while queue.state(request) is not None:
        if time.monotonic() >= deadline:
            raise TpuError(f"{request.name} was still being deleted after {_DELETE_WAIT_S:g} s")
        _pause(poll_seconds)


def _submit(queue: TpuQueue, job: Job, args: argparse.Namespace) -> None:
    watch = JobWatch(job.output_uri, job.manifest_stage)
    clock = _Clock(args.timeout_minutes)
    attempts = args.retries + 1
    project = job.request.project
    log(
        "submit",
        "every worker's output, live in Cloud Logging (all attempts): "
        + gcloud_commands.logs_filter(project, job.workdir)
        + f" ({gcloud_commands.logs_explorer_url(project, job.workdir)})",
    )
    for attempt in range(1, attempts + 1):
        attempt_id = _attempt_id(attempt)
        request = job.attempt(attempt_id)
        provisioning = request.reservation_name or request.provisioning
        log(
            "submit",
            f"creating {request.name} ({request.accelerator_type}, {provisioning}) in "
            f"{request.zone}: {job.stage} on every worker, attempt "
            f"{attempt} of {attempts}",
        )
        queue.create(request)
        outcome = None
        try:
            outcome = _follow(
                queue,
                request,
                watch,
                job.status_uri(attempt_id),
                clock,
                args.poll_seconds,
            )
        finally:
            # A preempted slice is useless even with --keep; anything else (success, failure,
            # timeout, Ctrl-C, an error here) deletes it unless asked not to.
            if not args.keep or (outcome is not None and outcome.kind == "preempted"):
                _delete(queue, request)
            else:
                log(
                    "submit",
                    f"kept {request.name}; delete it with: "
                    + shlex.join(gcloud_commands.delete(request)),
                )
        if outcome.kind == "succeeded":
            log("submit", f"succeeded after {clock.elapsed()}: {outcome.message}")
            return
        if outcome.kind == "failed":
            if outcome.details:
                log("submit", "the end of the worker's log:\n" + outcome.details)
            raise JobFailed(outcome.message)
        log("submit", f"preempted: {outcome.message}")
        if attempt == attempts:
            raise Preempted(f"{request.name} was preempted {attempts} times; submit again")
        _wait_gone(queue, request, args.poll_seconds)
        log("submit", "resubmitting; training resumes from its last checkpoint")


def main(argv: list[str]) -> None:
    # Intermixed: overrides may come before, between or after the options.
    args = _parser().parse_intermixed_args(argv)
    job = _job(args)
    if args.dry_run:
        _print_commands(job, args.script_out)
        return
    _submit(TpuQueue(), _pinned(job), args)


def _pinned(job: Job) -> Job:
    """The job with its image tag resolved to a digest, before any TPU is requested: every
    worker of every attempt then runs the same image, whatever the tag does meanwhile."""
    image = image_digest.resolve(job.image)
    if image != job.image:
        log("submit", f"{job.image} is {image}")
    return dataclasses.replace(job, image=image)
