"""`gemma-sae submit` against a local fake of the Cloud TPU API, with the workdir in the GCS
emulator; its startup script run under bash with stub commands; its --dry-run gcloud commands
checked by the installed gcloud offline.

No emulator of the TPU API exists, so `FakeTpuApi` is a small HTTP server implementing the
REST endpoints the client calls (create, get and delete a queued resource, get a node). It
records every request so the tests can check what would be sent to Google, and it plays a
script of states per created queued resource; a hook stands in for the job on the TPU,
writing what the real container and startup script would write to GCS.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from jobs import cli
from jobs.cloud import image_digest, startup_script, submit, tpu_queue
from sae.errors import ConfigError, InputError, Preempted
from sae.io import manifest, storage

from .conftest import local_http_server

ROOT = Path(__file__).resolve().parents[1]
PROJECT, ZONE, NAME = "my-project", "us-west4-a", "sae-test"
PARENT = f"projects/{PROJECT}/locations/{ZONE}"
IMAGE = "us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae:abc123"
# What the fake registry says the tag names now.
DIGEST = "sha256:" + "5e" * 32
PINNED = "us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae@" + DIGEST
SERVICE_ACCOUNT = "sae-tpu@my-project.iam.gserviceaccount.com"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None


@dataclass
class FakeTpuApi:
    """The TPU API v2's queued-resource and node endpoints, played from a script.

    `attempts[i]` is the list of states the i-th created queued resource shows on successive
    reads (the last one repeats). `on_state(attempt, state, body)` runs when an attempt first
    shows a state: the tests use it to act as the job (write a manifest, an exit code).
    """

    attempts: list[list[str]]
    on_state: Callable[[int, str, dict[str, Any]], None] = lambda attempt, state, body: None
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _live: dict[str, dict[str, Any]] = field(default_factory=dict)
    _created: int = 0

    def creates(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.method == "POST"]

    def deletes(self) -> list[Request]:
        return [r for r in self.requests if r.method == "DELETE"]

    def handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        self.requests.append(request)
        path = request.path.removeprefix("/v2/")
        if request.method == "POST" and path == f"{PARENT}/queuedResources":
            name = f"{PARENT}/queuedResources/{request.query['queuedResourceId'][0]}"
            if name in self._live:
                return 409, _error(409, "ALREADY_EXISTS", f"{name} already exists")
            self._live[name] = {"body": request.body, "attempt": self._created, "reads": 0}
            self._created += 1
            return 200, {"name": f"{PARENT}/operations/create-{self._created}", "done": False}
        if "/nodes/" in path:
            name = path.replace("/nodes/", "/queuedResources/")
            if name not in self._live:
                return 404, _error(404, "NOT_FOUND", f"{path} not found")
            state = self._live[name]["state"]
            node_state = {"ACTIVE": "READY", "SUSPENDED": "PREEMPTED"}.get(state, "CREATING")
            return 200, {"name": path, "state": node_state}
        if path not in self._live:
            return 404, _error(404, "NOT_FOUND", f"{path} not found")
        if request.method == "DELETE":
            del self._live[path]
            return 200, {"name": f"{PARENT}/operations/delete-{self._created}", "done": False}
        return 200, self._read(path)

    def _read(self, name: str) -> dict[str, Any]:
        live = self._live[name]
        states = self.attempts[live["attempt"]]
        state = states[min(live["reads"], len(states) - 1)]
        if live.get("state") != state:
            live["state"] = state
            self.on_state(live["attempt"], state, live["body"])
        live["reads"] += 1
        body: dict[str, Any] = {"name": name, "tpu": live["body"]["tpu"], "state": {"state": state}}
        if state == "FAILED":
            body["state"]["failedData"] = {"error": {"code": 8, "message": "no v5e capacity"}}
        if state in ("SUSPENDING", "SUSPENDED"):
            body["state"]["stateInitiator"] = "SERVICE"
        return body


def _error(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "status": status, "message": message}}


@contextlib.contextmanager
def _serve(api: FakeTpuApi) -> Iterator[FakeTpuApi]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            request = Request(self.command, url.path, parse_qs(url.query), body)
            status, answer = api.handle(request)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    with local_http_server(Handler) as api.url:
        yield api


class FakeRegistry(BaseHTTPRequestHandler):
    """A Docker Registry v2 endpoint (no emulator exists; Artifact Registry serves this API):
    HEAD /v2/<path>/manifests/<tag> answers the tag's digest; every request is recorded and
    must ask for both manifest kinds; an unknown tag is a 404."""

    requests: list[tuple[str, str, str]] = []
    tags = {"my-project/gemma-sae/gemma-sae": {"abc123": DIGEST}}

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        FakeRegistry.requests.append(("HEAD", self.path, self.headers.get("Accept", "")))
        match = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", self.path)
        digest = match and self.tags.get(match.group(1), {}).get(match.group(2))
        accept = self.headers.get("Accept", "")
        assert "manifest.v2+json" in accept and "image.index.v1+json" in accept, accept
        self.send_response(200 if digest else 404)
        if digest:
            self.send_header("Docker-Content-Digest", digest)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """Every submission in this module resolves its image tag against FakeRegistry."""
    FakeRegistry.requests = []
    with local_http_server(FakeRegistry) as url:
        monkeypatch.setenv(image_digest.ENDPOINT_ENV, url)
        yield FakeRegistry.requests


@pytest.fixture
def fake_tpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeTpuApi]]:
    """Start a FakeTpuApi and point the submit command's TPU client at it."""
    with contextlib.ExitStack() as stack:

        def start(attempts: list[list[str]], on_state: Callable | None = None) -> FakeTpuApi:
            api = FakeTpuApi(attempts, on_state or (lambda attempt, state, body: None))
            stack.enter_context(_serve(api))
            monkeypatch.setenv(tpu_queue.ENDPOINT_ENV, api.url)
            return api

        yield start


def _argv(workdir: str, *extra: str) -> list[str]:
    return [
        "--project", PROJECT, "--zone", ZONE, "--tpu-name", NAME, "--image", IMAGE,
        "--workdir", workdir, "--stage", "train", "--poll-seconds", "0.02",
        "--service-account", SERVICE_ACCOUNT, *extra,
    ]  # fmt: skip


def _script(create: dict[str, Any]) -> str:
    return create["tpu"]["nodeSpec"][0]["node"]["metadata"]["startup-script"]


def _script_value(script: str, name: str) -> list[str]:
    """A variable's value(s) in the startup script, as bash reads them."""
    line = re.search(rf"^{name}=\(?(.*?)\)?$", script, re.MULTILINE)
    assert line, f"no {name}= in the startup script"
    return shlex.split(line.group(1))


def _status_uri(create: dict[str, Any]) -> str:
    return _script_value(_script(create), "STATUS_URI")[0]


def _worker_exit(create: dict[str, Any], code: int, log: str = "") -> None:
    """What the startup script leaves in GCS when the container exits with `code`."""
    status = _status_uri(create)
    storage.write_text(storage.join(status, "worker-0.log"), log)
    storage.write_json(
        storage.join(status, "worker-0.json"), {"worker": 0, "exit_code": code, "host": "w-0"}
    )


def _train_manifest(workdir: str) -> None:
    """What the train stage writes last, on success."""
    manifest.write(storage.join(workdir, "sae"), "train", {}, {}, {"steps": 60}, [])


def _when(wanted: str, action: Callable[[dict[str, Any]], None], attempt: int = 0) -> Callable:
    def on_state(index: int, state: str, body: dict[str, Any]) -> None:
        if index == attempt and state == wanted:
            action(body)

    return on_state


# ---------------------------------------------------------------------------------------
# Requests and the happy path


@pytest.mark.gcs
def test_submit_creates_the_tpu_waits_for_the_manifest_and_deletes_it(
    fake_tpu, gcs_bucket_uri: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    api = fake_tpu(
        [["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]],
        _when("ACTIVE", lambda body: _train_manifest(gcs_bucket_uri)),
    )
    config = "configs/gemma2-2b-v5e-8.yaml"
    submit.main(
        _argv(gcs_bucket_uri, "--spot", "--service-account", SERVICE_ACCOUNT)
        + ["--network", "tpu-net", "--subnetwork", "tpu-subnet", "--config", config]
        + ["train.steps=20000"]
    )

    post = next(r for r in api.requests if r.method == "POST")
    assert post.path == f"/v2/{PARENT}/queuedResources"
    assert post.query["queuedResourceId"] == [NAME]
    create = post.body
    assert create["spot"] == {} and "reservationName" not in create
    [spec] = create["tpu"]["nodeSpec"]
    assert spec["parent"] == PARENT and spec["nodeId"] == NAME
    node = spec["node"]
    assert node["acceleratorType"] == "v5litepod-8"
    assert node["runtimeVersion"] == "v2-alpha-tpuv5-lite"
    # No external IPs: false is the API's default, so the field may be left out.
    assert node["networkConfig"].get("enableExternalIps", False) is False
    assert node["networkConfig"]["network"] == "tpu-net"
    assert node["networkConfig"]["subnetwork"] == "tpu-subnet"
    assert node["serviceAccount"] == {"email": SERVICE_ACCOUNT, "scope": [tpu_queue.SCOPE]}

    script = _script(create)
    # The tag resolved to its digest before the request: every worker runs that image.
    assert _script_value(script, "IMAGE") == [PINNED]
    assert _script_value(script, "STAGE") == ["train"]
    assert _script_value(script, "OVERRIDES") == ["train.steps=20000"]
    assert _script_value(script, "WORKDIR") == [gcs_bucket_uri]
    assert _script_value(script, "CONFIG") == [""]  # the local config travels in the script
    assert _script_value(script, "MAX_RUNS") == ["1"]  # exit 75 is for submit to resubmit
    assert _status_uri(create).startswith(f"{gcs_bucket_uri}/submissions/{NAME}/")
    # What the script runs on a worker: the shipped config mounted, and a command line the
    # image's CLI accepts.
    calls, uploads = _run_startup(script, tmp_path)
    container = _container_args(calls)
    parsed = cli._parser().parse_args(container)
    assert (parsed.stage, parsed.config, parsed.force) == ("train", CONFIG_IN_CONTAINER, False)
    assert parsed.overrides == [f"workdir={gcs_bucket_uri}", "train.steps=20000"]
    assert (tmp_path / "etc_gemma-sae" / "job.yaml").read_text() == (ROOT / config).read_text()
    assert set(uploads) == {"worker-1.log", "worker-1.json", "worker-1.alive"}

    [delete] = api.deletes()
    assert delete.path == f"/v2/{PARENT}/queuedResources/{NAME}"
    assert delete.query["force"] == ["true"]
    assert api.requests[-1] is delete
    err = capsys.readouterr().err
    states = re.findall(rf"{NAME}: ([A-Z_]+)", err)
    assert states == ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
    assert "succeeded" in err and "sae/manifest.json (steps=60)" in err


@pytest.mark.gcs
def test_a_tpu_that_cannot_be_provisioned_fails_the_command_and_is_deleted(
    fake_tpu, gcs_bucket_uri: str
) -> None:
    api = fake_tpu([["WAITING_FOR_RESOURCES", "FAILED"]])
    with pytest.raises(submit.JobFailed, match="could not be provisioned: no v5e capacity"):
        submit.main(_argv(gcs_bucket_uri, "--reservation", "my-res"))
    [create] = api.creates()
    assert create["reservationName"] == f"{PARENT}/reservations/my-res"
    assert "spot" not in create
    assert len(api.deletes()) == 1


@pytest.mark.gcs
def test_a_failed_job_is_reported_with_its_log_and_the_tpu_deleted(
    fake_tpu, gcs_bucket_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    log = "[train] loading\nerror: unknown config key 'train.stpes'\n"
    api = fake_tpu(
        [["PROVISIONING", "ACTIVE"]], _when("ACTIVE", lambda body: _worker_exit(body, 2, log))
    )
    with pytest.raises(submit.JobFailed, match="worker 0 exited with code 2") as failure:
        submit.main(_argv(gcs_bucket_uri))
    assert "\n" not in str(failure.value)
    assert "unknown config key 'train.stpes'" in capsys.readouterr().err
    assert len(api.deletes()) == 1


@pytest.mark.gcs
def test_an_earlier_manifest_counts_only_when_the_job_finds_it_up_to_date(
    fake_tpu, gcs_bucket_uri: str
) -> None:
    _train_manifest(gcs_bucket_uri)  # from an earlier run
    api = fake_tpu(
        [["ACTIVE"], ["ACTIVE"]], _when("ACTIVE", lambda body: _worker_exit(body, 0), attempt=1)
    )
    # First job: still running (no exit code, no new manifest) when the timeout comes.
    with pytest.raises(submit.JobFailed, match="no outcome within 0.01 minutes"):
        submit.main(_argv(gcs_bucket_uri, "--timeout-minutes", "0.01"))
    assert len(api.deletes()) == 1
    # Second job: worker 0 exits 0 and the stage's manifest is there.
    submit.main(_argv(gcs_bucket_uri, "--timeout-minutes", "1"))
    assert len(api.deletes()) == 2


# ---------------------------------------------------------------------------------------
# Preemption, --keep, Ctrl-C


@pytest.mark.gcs
def test_a_preempted_spot_tpu_is_resubmitted_and_the_job_resumes(
    fake_tpu, gcs_bucket_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    api = fake_tpu(
        [["PROVISIONING", "ACTIVE", "SUSPENDED"], ["PROVISIONING", "ACTIVE"]],
        _when("ACTIVE", lambda body: _train_manifest(gcs_bucket_uri), attempt=1),
    )
    submit.main(_argv(gcs_bucket_uri, "--spot", "--retries", "2"))

    first, second = api.creates()
    methods = [r.method for r in api.requests]
    assert methods.count("DELETE") == 2
    # Deleted, gone (404), then created again under the same name.
    second_post = methods.index("POST", 1)
    assert methods[second_post - 2 : second_post] == ["DELETE", "GET"]
    # The same job, only its status prefix differs: the train stage resumes from its
    # checkpoint in the workdir.
    assert _status_uri(first) != _status_uri(second)
    assert _script(first).replace(_status_uri(first), "") == _script(second).replace(
        _status_uri(second), ""
    )
    err = capsys.readouterr().err
    assert "SUSPENDED (by service)" in err and "resubmitting" in err
    assert "attempt 2 of 3" in err
    # Both attempts run the digest the tag named at submission, resolved once.
    assert _script_value(_script(second), "IMAGE") == [PINNED]
    assert f"{IMAGE} is {PINNED}" in err


def test_an_image_tag_the_registry_lacks_stops_before_any_tpu(
    fake_tpu, fake_registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = fake_tpu([["ACTIVE"]])
    missing = IMAGE.replace(":abc123", ":not-pushed")
    with pytest.raises(InputError, match="the registry has no such image or tag") as raised:
        submit.main(_argv("gs://bucket/run", "--image", missing))
    assert "\n" not in str(raised.value) and api.requests == []
    assert fake_registry == [
        ("HEAD", "/v2/my-project/gemma-sae/gemma-sae/manifests/not-pushed", image_digest.ACCEPT)
    ]
    # An image already pinned is used as it is, with no registry request.
    assert image_digest.resolve(PINNED) == PINNED and len(fake_registry) == 1
    assert image_digest.split("h/p/q/name") == ("h", "p/q/name", "latest")


@pytest.mark.gcs
def test_a_worker_that_stops_beating_ends_the_attempt(
    fake_tpu, gcs_bucket_uri: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Worker 0's VM dies without an exit code (no heartbeat past the limit): submit stops
    waiting, deletes the slice and asks again, instead of waiting for --timeout-minutes."""
    from jobs.cloud import job_outcome

    monkeypatch.setattr(job_outcome, "LOST_AFTER_SECONDS", 0.3)
    api = fake_tpu(
        [["ACTIVE"], ["ACTIVE"]],
        _when("ACTIVE", lambda body: _train_manifest(gcs_bucket_uri), attempt=1),
    )
    submit.main(_argv(gcs_bucket_uri, "--retries", "1"))
    assert len(api.creates()) == 2 and len(api.deletes()) == 2
    err = capsys.readouterr().err
    assert "preempted: worker 0 stopped reporting (no heartbeat for 0.3 s)" in err


@pytest.mark.gcs
def test_heartbeats_tell_live_workers_from_lost_ones(gcs_bucket_uri: str) -> None:
    from jobs.cloud import job_outcome

    status, limit = f"{gcs_bucket_uri}/status", job_outcome.LOST_AFTER_SECONDS
    storage.write_text(f"{status}/worker-0.alive", "1000000\n")  # beat at t=1e6
    storage.write_text(f"{status}/worker-2.alive", "1000000\n")
    lost = job_outcome.lost_workers
    # Worker 1 has never beaten: lost once the slice is older than the limit; worker 2 is done.
    assert lost(status, 3, {2: 0}, active_since=1e6, now=1e6 + limit - 1) == []
    assert lost(status, 3, {2: 0}, active_since=1e6, now=1e6 + limit + 1) == [0, 1]
    storage.write_text(f"{status}/worker-0.alive", str(int(1e6 + limit)))
    assert lost(status, 3, {2: 0}, active_since=1e6, now=1e6 + limit + 1) == [1]
    assert submit._hosts("v5litepod-8") == 1 and submit._hosts("v5litepod-32") == 4


@pytest.mark.gcs
def test_preemption_after_the_last_retry_exits_as_preempted(fake_tpu, gcs_bucket_uri) -> None:
    api = fake_tpu([["ACTIVE", "SUSPENDED"]])
    with pytest.raises(Preempted):
        submit.main(_argv(gcs_bucket_uri, "--spot", "--retries", "0"))
    assert len(api.creates()) == 1 and len(api.deletes()) == 1


@pytest.mark.gcs
def test_keep_leaves_the_tpu_and_a_second_submission_refuses_its_name(
    fake_tpu, gcs_bucket_uri: str
) -> None:
    api = fake_tpu([["ACTIVE"]], _when("ACTIVE", lambda body: _train_manifest(gcs_bucket_uri)))
    submit.main(_argv(gcs_bucket_uri, "--keep"))
    with pytest.raises(
        tpu_queue.TpuError, match=f"cannot create {NAME} in {ZONE}: .* already exists"
    ):
        submit.main(_argv(gcs_bucket_uri))
    assert api.deletes() == []


@pytest.mark.gcs
def test_ctrl_c_deletes_the_tpu(
    fake_tpu, gcs_bucket_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = fake_tpu([["WAITING_FOR_RESOURCES"]])

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "_pause", interrupted)
    with pytest.raises(KeyboardInterrupt):
        submit.main(_argv(gcs_bucket_uri))
    assert len(api.creates()) == 1 and len(api.deletes()) == 1


@pytest.mark.gcs
def test_an_unreachable_tpu_api_is_a_one_line_error(
    gcs_bucket_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tpu_queue.ENDPOINT_ENV, "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(tpu_queue.TpuError, match=f"cannot create TPU {NAME}: ") as raised:
        submit.main(_argv(gcs_bucket_uri))
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------
# Arguments checked before anything is created


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--accelerator-type", "v4-8"], InputError, "--accelerator-type='v4-8' is not valid"),
        (["--zone", "us-west4"], InputError, "--zone='us-west4' is not valid"),
        (["--image", "python:3.11"], InputError, "--image='python:3.11' is not valid"),
        (["--workdir", "runs/local"], InputError, "--workdir must be a gs:// URI"),
        (["workdir=gs://b/other"], InputError, "with --workdir, not workdir="),
        (["--retries", "-1"], InputError, "--retries"),
        (["tokenize.input=gs://b/my docs"], InputError, "'tokenize.input=gs://b/my docs' cannot"),
        (["train.stpes=3"], ConfigError, "unknown config key 'train.stpes'"),
        (["model.preset=/home/me/gemma"], ConfigError, "model.preset='/home/me/gemma' must"),
    ],
)
def test_bad_arguments_stop_before_any_request(
    extra: list[str], error: type[Exception], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens here: a request would fail with a connection error instead.
    monkeypatch.setenv(tpu_queue.ENDPOINT_ENV, "http://127.0.0.1:9")
    with pytest.raises(error, match=re.escape(message)) as raised:
        submit.main(_argv("gs://bucket/run") + extra)
    assert "\n" not in str(raised.value)


def test_submit_refuses_to_run_without_a_service_account(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without one the TPU VMs would run as the Compute Engine default account."""
    monkeypatch.setenv(tpu_queue.ENDPOINT_ENV, "http://127.0.0.1:9")
    argv = _argv("gs://bucket/run")
    at = argv.index("--service-account")
    with pytest.raises(SystemExit) as raised:
        submit.main(argv[:at] + argv[at + 2 :])
    assert raised.value.code == 2
    assert "--service-account" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The startup script, run by bash with stub commands


_STUBS = {
    # The TPU VM metadata server: worker 1 of a two-host slice.
    "curl": """case "$*" in
  *agent-worker-number*) printf 1 ;;
  *worker-network-endpoints*) printf 'unknown:unknown:10.0.0.2,unknown:unknown:10.0.0.3' ;;
  *) exit 22 ;;
esac""",
    # gcloud storage cp SRC gs://.../NAME copies to $OUT/NAME.
    "gcloud": """echo "gcloud $*" >> "$CALLS"
if [ "$1 $2" = "storage cp" ]; then cp "$3" "$OUT/${4##*/}"; fi""",
    "docker": """echo "docker $*" >> "$CALLS"
if [ "$1" = run ]; then echo "training on worker $TPU_WORKER_ID"; exit "$DOCKER_EXIT"; fi""",
}


# Where the script keeps files on the VM -> their names in a test's tmp_path.
_VM_PATHS = {
    "/etc/gemma-sae": "etc_gemma-sae",
    "/var/log/gemma-sae-job.log": "job.log",
    "/tmp/gemma-sae-status.json": "status.json",
    "/tmp/libtpu_lockfile": "libtpu_lockfile",
}
CONFIG_IN_CONTAINER = "/job/config.yaml"


def _run_startup(
    script: str, tmp_path: Path, docker_exit: int = 0
) -> tuple[list[str], dict[str, str]]:
    """Run a startup script as worker 1 of a two-host slice, with stub curl, gcloud and
    docker; returns the commands it ran and the files it uploaded (name -> text)."""
    for path, name in _VM_PATHS.items():
        assert path in script
        script = script.replace(path, str(tmp_path / name))
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    for name, body in _STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls"),
        "OUT": str(out),
        "DOCKER_EXIT": str(docker_exit),
        "TPU_WORKER_ID": "",
    }
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True)
    assert done.returncode == docker_exit, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    return calls, {path.name: path.read_text() for path in out.iterdir()}


def _container_args(calls: list[str]) -> list[str]:
    """The arguments the container got in the script's (one) `docker run`."""
    [run] = [shlex.split(c) for c in calls if c.startswith("docker run")]
    image = next(a for a in run if a in (IMAGE, PINNED))
    return run[run.index(image) + 1 :]


def test_startup_script_is_valid_bash(tmp_path: Path) -> None:
    """The rendering submit sends, with a config that would break a careless quoting."""
    config = "train:\n  name: 'it''s ${HOME} %{x} `id`'\nEOF\n"
    script = tmp_path / "startup.sh"
    script.write_text(
        startup_script.render(IMAGE, "train", "gs://b/r", "gs://b/r/s", ["a=1"], "", config)
    )
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shellcheck = shutil.which("shellcheck") or ROOT / ".venv-checkov" / "bin" / "shellcheck"
    if Path(shellcheck).exists():
        result = subprocess.run(
            [str(shellcheck), "-s", "bash", "-S", "warning", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout
    # The shipped config arrives byte for byte.
    _run_startup(script.read_text(), tmp_path)
    assert (tmp_path / "etc_gemma-sae" / "job.yaml").read_text() == config


def test_startup_script_runs_the_container_on_a_worker_and_reports_its_exit(
    tmp_path: Path,
) -> None:
    """A stage that stops to be resumed (exit 75) is not restarted on the worker: its exit
    code goes to GCS at once, after its log, for submit to request a new slice."""
    status = "gs://bucket/run/submissions/x/1"
    script = startup_script.render(
        IMAGE, "train", "gs://bucket/run", status + "/", ["train.steps=10", "--force"],
        "gs://bucket/configs/train.yaml",
    )  # fmt: skip
    calls, uploads = _run_startup(script, tmp_path, docker_exit=75)
    # The heartbeat runs beside the stage (its time and order are its own).
    beats = [c for c in calls if c.endswith(f"{status}/worker-1.alive")]
    assert beats and all(c.startswith("gcloud storage cp ") for c in beats)
    calls = [c for c in calls if c not in beats]

    assert calls[0] == "gcloud auth configure-docker us-west4-docker.pkg.dev --quiet"
    assert calls[1] == f"docker pull {IMAGE}"
    [run] = [c for c in calls if c.startswith("docker run")]
    assert run.startswith(
        f"docker run --name {startup_script.CONTAINER} --stop-timeout 25 --user 0:0 --privileged "
        "--net=host --ipc=host "
        "--log-driver=gcplogs --log-opt labels=gemma_sae_workdir,gemma_sae_stage,gemma_sae_worker "
        "--label gemma_sae_workdir=gs://bucket/run --label gemma_sae_stage=train "
        "--label gemma_sae_worker=1 "
        "-e TPU_WORKER_ID=1 -e TPU_WORKER_HOSTNAMES=10.0.0.2,10.0.0.3 " + IMAGE
    )
    assert "--rm" not in run, "the container stays for `docker logs` after it exits"
    parsed = cli._parser().parse_args(_container_args(calls))
    assert parsed.overrides == ["workdir=gs://bucket/run", "train.steps=10"]
    assert (parsed.config, parsed.force) == ("gs://bucket/configs/train.yaml", True)
    assert not (tmp_path / "etc_gemma-sae").exists(), "nothing to mount"
    # The log goes up before the exit code: the submitter reads it once the code is there.
    copies = [c.split()[-1] for c in calls if c.startswith("gcloud storage cp")]
    assert copies == [f"{status}/worker-1.log", f"{status}/worker-1.json"]
    reported = json.loads(uploads["worker-1.json"])
    assert (reported["worker"], reported["exit_code"]) == (1, 75)
    assert "training on worker" in uploads["worker-1.log"]


# ---------------------------------------------------------------------------------------
# --dry-run: the gcloud commands, checked by the installed gcloud without credentials

_GCLOUD = shutil.which("gcloud")
_AUTH = re.compile(r"active account|credentials|gcloud auth login", re.IGNORECASE)


def _gcloud(argv: list[str], config_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run gcloud with an empty configuration: no account, no prompts, no update checks.
    Argument errors exit 2 before anything else; a well-formed command fails at auth."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLOUDSDK_", "GOOGLE_APPLICATION_CREDENTIALS"))
    }
    env.update(
        CLOUDSDK_CONFIG=str(config_dir),
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="1",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
    )
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
    )


def _dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[list[str]]:
    script = tmp_path / f"startup-{len(list(tmp_path.iterdir()))}.sh"
    submit.main(_argv("gs://bucket/run", "--dry-run", "--script-out", str(script), *extra))
    out = capsys.readouterr().out
    assert script.read_text().startswith("#!/bin/bash")
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


@pytest.mark.skipif(_GCLOUD is None, reason="gcloud is not installed")
def test_dry_run_prints_gcloud_commands_that_gcloud_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spot = _dry_run(tmp_path, capsys, "--spot", "--external-ips", "--network", "tpu-net")
    named = _dry_run(tmp_path, capsys, "--reservation", "my-res", "--subnetwork", "tpu-subnet")
    reserved = _dry_run(tmp_path, capsys, "--reserved", "--service-account", SERVICE_ACCOUNT)
    create = spot[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", NAME]
    assert "--spot" in create and "--internal-ips" not in create
    assert "--accelerator-type=v5litepod-8" in create
    assert any(a.startswith("--metadata-from-file=startup-script=") for a in create)
    assert named[0][:2] == ["gcloud", "alpha"] and "--reservation=my-res" in named[0]
    assert "--internal-ips" in named[0] and "--reserved" in reserved[0]
    assert {"--worker=all", "--tunnel-through-iap"} <= set(named[3])
    assert spot[-1][-2:] == ["--force", "--async"]

    # The checker catches malformed commands: an unknown flag, a missing required flag.
    broken = [create + ["--no-such-flag"], [a for a in create if "runtime" not in a]]
    commands = spot + named + [reserved[0]]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda argv: _gcloud(argv, tmp_path / "gcloud"), broken + commands))
    for argv, result in zip(broken, results[:2], strict=True):
        assert result.returncode == 2, (argv, result.stderr)
    for argv, result in zip(commands, results[2:], strict=True):
        assert result.returncode not in (0, 2), (shlex.join(argv), result.stderr)
        assert _AUTH.search(result.stderr), (shlex.join(argv), result.stderr)
