"""The gcloud commands equivalent to a submission, for `gemma-sae submit --dry-run` and for
running a job by hand. Each is an argv list; `render` joins them with shell quoting."""

from __future__ import annotations

import shlex
import urllib.parse

from jobs.cloud.startup_script import CONTAINER
from jobs.cloud.tpu_queue import SCOPE, NodeRequest

REMOTE_SCRIPT = "gemma-sae-job.sh"


def _tpus(alpha: bool = False) -> list[str]:
    return ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus"]


def _where(request: NodeRequest) -> list[str]:
    return [f"--project={request.project}", f"--zone={request.zone}"]


def create(request: NodeRequest, script_path: str) -> list[str]:
    # A named reservation has a flag only in the alpha track; the API call is the same.
    named = request.provisioning == "reserved" and bool(request.reservation)
    argv = [
        *_tpus(named),
        "queued-resources",
        "create",
        request.name,
        f"--node-id={request.name}",
        *_where(request),
        f"--accelerator-type={request.accelerator_type}",
        f"--runtime-version={request.runtime_version}",
    ]
    if request.provisioning == "spot":
        argv.append("--spot")
    elif named:
        argv.append(f"--reservation={request.reservation}")
    elif request.provisioning == "reserved":
        argv.append("--reserved")
    if request.service_account:
        argv.append(f"--service-account={request.service_account}")
    argv.append(f"--scopes={SCOPE}")
    if request.network:
        argv.append(f"--network={request.network}")
    if request.subnetwork:
        argv.append(f"--subnetwork={request.subnetwork}")
    if not request.external_ips:
        argv.append("--internal-ips")
    argv.append(f"--metadata-from-file=startup-script={script_path}")
    return argv


def describe(request: NodeRequest) -> list[str]:
    return [*_tpus(), "queued-resources", "describe", request.name, *_where(request)]


def delete(request: NodeRequest) -> list[str]:
    return [
        *_tpus(),
        "queued-resources",
        "delete",
        request.name,
        *_where(request),
        "--force",
        "--async",
    ]


def _ssh_access(request: NodeRequest) -> tuple[bool, list[str]]:
    # Workers without external IPs are reached through IAP, a flag of the alpha track.
    return (False, []) if request.external_ips else (True, ["--tunnel-through-iap"])


def copy_script(request: NodeRequest, script_path: str) -> list[str]:
    alpha, access = _ssh_access(request)
    return [
        *_tpus(alpha),
        "tpu-vm",
        "scp",
        script_path,
        f"{request.name}:{REMOTE_SCRIPT}",
        "--worker=all",
        *_where(request),
        *access,
    ]


def ssh(request: NodeRequest, command: str, worker: str = "all") -> list[str]:
    alpha, access = _ssh_access(request)
    return [
        *_tpus(alpha),
        "tpu-vm",
        "ssh",
        request.name,
        f"--worker={worker}",
        *_where(request),
        *access,
        f"--command={command}",
    ]


def follow_logs(request: NodeRequest) -> list[str]:
    return ssh(request, f"sudo docker logs -f {CONTAINER}", worker="0")


# What the startup script's docker logging writes (jobs/cloud/templates/tpu_startup.sh.tftpl).
DOCKER_LOG = "gcplogs-docker-driver"


def logs_filter(project: str, workdir: str, worker: str | None = None) -> str:
    """The Cloud Logging filter for a job's container output: every worker, or one."""
    labels = "jsonPayload.container.metadata"
    parts = [f'logName="projects/{project}/logs/{DOCKER_LOG}"']
    parts.append(f'{labels}.gemma_sae_workdir="{workdir}"')
    if worker is not None:
        parts.append(f'{labels}.gemma_sae_worker="{worker}"')
    return " AND ".join(parts)


def logs_explorer_url(project: str, workdir: str) -> str:
    query = urllib.parse.quote(logs_filter(project, workdir), safe="")
    return f"https://console.cloud.google.com/logs/query;query={query}?project={project}"


def read_logs(project: str, workdir: str) -> list[str]:
    """The job's recent container output from Cloud Logging, oldest first."""
    return [
        "gcloud",
        "logging",
        "read",
        logs_filter(project, workdir),
        f"--project={project}",
        "--freshness=1d",
        "--order=asc",
        "--format=value(timestamp,jsonPayload.container.metadata.gemma_sae_worker,"
        "jsonPayload.message,jsonPayload.data)",
    ]


def read_file(uri: str) -> list[str]:
    return ["gcloud", "storage", "cat", uri]


def submission(
    request: NodeRequest, script_path: str, worker_status: str, manifest: str, workdir: str
) -> list[tuple[str, list[str]]]:
    """A submission by hand, each command with what it is for."""
    return [
        (
            f"create the TPU; at boot every worker runs the job ({script_path})",
            create(request, script_path),
        ),
        ("its state: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE", describe(request)),
        (
            "or, on a TPU created without --metadata-from-file: copy the script to every worker",
            copy_script(request, script_path),
        ),
        ("... and run it there as root", ssh(request, f"sudo bash {REMOTE_SCRIPT}")),
        ("the job's log on worker 0", follow_logs(request)),
        ("every worker's log, from Cloud Logging", read_logs(request.project, workdir)),
        ("worker 0's exit code, once its job has ended", read_file(worker_status)),
        ("the outcome: the stage's manifest", read_file(manifest)),
        ("delete the TPU", delete(request)),
    ]


def render(commands: list[tuple[str, list[str]]]) -> str:
    """`# comment` lines followed by the shell-quoted command."""
    blocks = [f"# {comment}\n{shlex.join(argv)}" for comment, argv in commands]
    return "\n\n".join(blocks) + "\n"
