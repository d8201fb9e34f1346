"""The TPU VM startup script that runs one job in the container on every worker of a slice.

`gemma-sae submit` puts the rendered text in the node's `startup-script` metadata; every
worker runs it as root at boot (and again after a reboot, which is harmless: a finished
stage's manifest makes the re-run a no-op, and training resumes from its checkpoint).

Variables (infra/templates/startup.sh.tftpl, the Terraform side, takes image, stage,
config, overrides and workdir, which `args` here combines, and reads its status prefix from
metadata; the two should converge on one script):

- `image`: the container image, `REGION-docker.pkg.dev/PROJECT/REPOSITORY/NAME:TAG`.
- `registry`: the image's host, which docker authenticates to with the VM's service account.
- `args`: the container's arguments, `STAGE --config PATH key=value ...`.
- `config_yaml`: the job's YAML config, written to CONFIG_HOST_PATH and mounted read-only at
  CONFIG_PATH (None: the config is in the image or on GCS and nothing is mounted).
- `status_uri`: a `gs://` prefix under which each worker leaves `worker-N.log` (everything the
  job printed) and then `worker-N.json` (`{"worker": N, "exit_code": CODE, "host": ...}`),
  which is how the submitter learns that a job failed without waiting for its timeout.

Multi-host slices (v5litepod-16 and up): the container gets TPU_WORKER_ID and
TPU_WORKER_HOSTNAMES (from the `agent-worker-number` and `worker-network-endpoints`
metadata), so `jobs.common.init_distributed` joins the hosts into one JAX runtime.
"""

from __future__ import annotations

import shlex

from sae.errors import InputError

CONTAINER = "gemma-sae-job"
CONFIG_HOST_PATH = "/etc/gemma-sae/job.yaml"
CONFIG_PATH = "/job/config.yaml"
LOG_PATH = "/var/log/gemma-sae-job.log"
STATUS_PATH = "/tmp/gemma-sae-status.json"
LIBTPU_LOCK = "/tmp/libtpu_lockfile"
_HEREDOC = "GEMMA_SAE_CONFIG_EOF"

_TEMPLATE = """\
#!/bin/bash
# gemma-sae job, written by `gemma-sae submit`: runs on every worker of the TPU slice at boot.
# Not `set -e`: the job's exit code is reported to GCS even when a step fails.
set -uo pipefail

IMAGE={image}
REGISTRY={registry}
STATUS_URI={status_uri}
CONTAINER={container}
LOG={log_path}
STATUS={status_path}
ARGS=({args})

metadata() {{
  curl -sf --retry 5 -H 'Metadata-Flavor: Google' \\
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}}
WORKER=$(metadata agent-worker-number || echo 0)
# "name:id:ip,..." or plain hostnames, in worker order; one entry on a single-host slice.
HOSTS=$(metadata worker-network-endpoints | tr ',' '\\n' | awk -F: '{{print $NF}}' | paste -sd, -)
{write_config}
run_job() {{
  gcloud auth configure-docker "$REGISTRY" --quiet || return 125
  local try
  for try in 1 2 3; do
    docker pull "$IMAGE" && break
    [ "$try" = 3 ] && return 125
    sleep 15
  done
  # A container or libtpu lock left from before a reboot keeps the TPU "already in use".
  docker rm -f "$CONTAINER" >/dev/null 2>&1
  rm -f {libtpu_lock}
  # --privileged and --net=host: the TPU chips, and the other hosts of the slice.
  docker run --name "$CONTAINER" --privileged --net=host \\
    -e TPU_WORKER_ID="$WORKER" -e TPU_WORKER_HOSTNAMES="$HOSTS" {mount}\\
    "$IMAGE" "${{ARGS[@]}}"
}}

run_job 2>&1 | tee "$LOG"
CODE=${{PIPESTATUS[0]}}
printf '{{"worker": %d, "exit_code": %d, "host": "%s"}}\\n' "$WORKER" "$CODE" "$(hostname)" \\
  > "$STATUS"
# The log first: once the status exists, the submitter may read the log and stop the TPU.
gcloud storage cp "$LOG" "$STATUS_URI/worker-$WORKER.log"
gcloud storage cp "$STATUS" "$STATUS_URI/worker-$WORKER.json"
exit "$CODE"
"""

_WRITE_CONFIG = """
mkdir -p {directory}
cat > {path} <<'{heredoc}'
{text}
{heredoc}
chmod 0644 {path}
"""


def render(image: str, args: list[str], status_uri: str, config_yaml: str | None = None) -> str:
    """The startup script's text. With `config_yaml`, `args` should name CONFIG_PATH."""
    write_config, mount = "", ""
    if config_yaml is not None:
        text = config_yaml.rstrip("\n")
        if _HEREDOC in text.splitlines():
            raise InputError(f"the config must not contain a line reading {_HEREDOC}")
        write_config = _WRITE_CONFIG.format(
            directory=CONFIG_HOST_PATH.rsplit("/", 1)[0],
            path=CONFIG_HOST_PATH,
            heredoc=_HEREDOC,
            text=text,
        )
        mount = f"-v {CONFIG_HOST_PATH}:{CONFIG_PATH}:ro "
    return _TEMPLATE.format(
        image=shlex.quote(image),
        registry=shlex.quote(registry_host(image)),
        status_uri=shlex.quote(status_uri.rstrip("/")),
        container=CONTAINER,
        log_path=LOG_PATH,
        status_path=STATUS_PATH,
        libtpu_lock=LIBTPU_LOCK,
        args=" ".join(shlex.quote(arg) for arg in args),
        write_config=write_config,
        mount=mount,
    )


def registry_host(image: str) -> str:
    """The registry an image lives in: `us-west4-docker.pkg.dev/p/r/n:t` -> its first part."""
    return image.split("/", 1)[0]
