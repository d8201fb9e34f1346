"""Shared pytest setup: JAX/Keras env defaults and a real GCS emulator process."""

import os

# Before anything imports jax/keras/tensorflow: 8 emulated CPU devices for sharding
# tests, the JAX Keras backend, and quiet TensorFlow logs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A test's fake of an HTTP API (where no emulator exists) on 127.0.0.1, served from a
    thread: yields its base URL, and stops it after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _serve_emulator(argv: list[str]) -> None:
    """Run gcp-storage-emulator (``argv`` as for ``python -m gcp_storage_emulator``), with
    object downloads carrying ``x-goog-generation`` and ``x-goog-metageneration`` headers,
    as real GCS sends them, and uploads honouring ``ifGenerationMatch`` (below).

    tensorstore (Orbax's array writer) takes an object's generation from those headers
    whenever it reads it. The emulator leaves them out, so every read of an existing
    object comes back as generation 0, and the next write conditioned on it fails inside
    tensorstore with "Malformed StorageGeneration" (a GCS generation is never 0). Orbax
    hits this in its OCDBT database: each commit writes ``manifest.ocdbt`` with
    ``ifGenerationMatch`` set to the last generation it saw, which is normally the one its
    own previous write returned; only when it re-reads the manifest in between (parallel
    array writes within one save, so it depends on timing) does it pick up the bogus 0.
    Hence a checkpoint save to gs:// that failed now and then, at wait_until_finished.
    """
    from http import HTTPStatus

    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            params = request.params
            obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    from gcp_storage_emulator.exceptions import NotFound

    insert = objects.insert

    def insert_with_preconditions(request, response, storage, *args, **kwargs):
        # GCS refuses an upload whose ifGenerationMatch is not the object's generation (0:
        # no object) with 412; the emulator ignores the parameter. Media and multipart
        # uploads (what single-object writes use) honour it here.
        wanted = request.query.get("ifGenerationMatch")
        if wanted:
            name = request.query.get("name", [None])[0]
            if name is None and isinstance(request.data, dict):
                name = request.data.get("meta", {}).get("name")
            try:
                current = storage.get_file_obj(request.params["bucket_name"], name)["generation"]
            except NotFound:
                current = "0"
            if str(current) != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                return None
        return insert(request, response, storage, *args, **kwargs)

    # Patched before the server module is imported: its route table binds handlers then.
    assert "gcp_storage_emulator.server" not in sys.modules
    objects.download = download_with_generation
    objects.insert = insert_with_preconditions
    from gcp_storage_emulator.__main__ import main

    main(argv)


@dataclass(frozen=True)
class GcsEmulator:
    """A running gcp-storage-emulator: ``env`` is what subprocesses need to use it."""

    url: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, log_path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                raise RuntimeError(f"GCS emulator exited early:\n{f.read()}")
        try:
            with urllib.request.urlopen(url + "/", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"GCS emulator did not answer at {url} within {timeout}s")


def emulator_env(url: str) -> dict[str, str]:
    """Env vars pointing every GCS client we use at the emulator at ``url``."""
    return {
        # google-cloud-storage and gcsfs.
        "STORAGE_EMULATOR_HOST": url,
        # tensorstore (Orbax array writes) has its own endpoint override, and a fixed
        # test token so it does not look for ADC files or a GCE metadata server.
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # etils.epath: use gcsfs, not TensorFlow's gfile (which cannot reach an emulator).
        "EPATH_USE_TF": "false",
        # gcsfs: skip the gRPC Storage Control bucket-layout probe the emulator lacks.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "test",
    }


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """Start a real emulator process on a free port (lazily: only if a test asks)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    # This file run as a script: the emulator with _serve_emulator's fix (see there).
    cmd = [sys.executable, __file__, "start"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    mp = pytest.MonkeyPatch()
    try:
        _wait_until_up(proc, url, str(log_path))
        env = emulator_env(url)
        for key, value in env.items():
            mp.setenv(key, value)
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        _create_bucket(bucket)
        yield GcsEmulator(url=url, bucket=bucket, env=env)
    finally:
        mp.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _create_bucket(name: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(name)


@pytest.fixture
def gcs_bucket_uri(gcs_emulator: GcsEmulator) -> str:
    """A fresh, empty prefix in the emulator's bucket: gs://bucket/test-<uuid>."""
    return f"gs://{gcs_emulator.bucket}/test-{uuid.uuid4().hex[:12]}"


# A small demo configuration shared by the end-to-end tests: a 2-layer model, a few steps, and
# the default pair of SAEs (ReLU and TopK) trained together on layer 1.
SMALL_SAES = ("relu-L1-x4-c2", "topk-L1-x4-k16")
SMALL = [
    "demo.num_documents=1000",
    "demo.num_files=2",
    "demo.num_layers=2",
    "demo.hidden_dim=64",
    "demo.vocabulary_size=512",
    "demo.lm_train_steps=80",
    "tokenize.num_shards=2",
    "tokenize.eval_fraction=0.1",
    "train.saes.0.layer=1",
    "train.saes.0.expansion_factor=4",
    "train.saes.1.layer=1",
    "train.saes.1.expansion_factor=4",
    "train.saes.1.k=16",
    "train.steps=60",
    "train.batch_size=256",
    "train.shuffle_buffer=2048",
    "train.checkpoint_every=30",
    "train.n_checkpoints=1",
    "train.log_every=10",
    "report.eval_tokens=4000",
    "report.max_features=40",
    "report.num_steering=4",
    "report.curve_sequences=64",
    "report.probing.max_documents=350",
]


@pytest.fixture(scope="session")
def local_run(tmp_path_factory: pytest.TempPathFactory):
    """One real local pipeline run (demo corpus, tiny model, tokens, SAE, report) that the
    end-to-end tests read and build on."""
    from jobs.cli import main

    workdir = tmp_path_factory.mktemp("pipeline")
    assert main(["pipeline", f"workdir={workdir}", *SMALL]) == 0
    return workdir


@pytest.fixture(scope="module")
def backbone(local_run):
    """The local run's tiny model (a module may define its own `backbone`)."""
    from sae.model import lm

    return lm.load_backbone(str(local_run / "model"))


@pytest.fixture(scope="module")
def tokens(local_run):
    """The local run's tokenize manifest."""
    from sae.io import manifest

    return manifest.read(str(local_run / "tokens"))


def reuse_run(local_run, workdir) -> list[str]:
    """Overrides for a run in `workdir` on `local_run`'s model, corpus and tokens (copied), so
    a test can run single stages after tokenize."""
    from sae.io import storage

    storage.upload_tree(str(local_run / "tokens"), str(workdir / "tokens"))
    return [
        f"workdir={workdir}",
        "demo.enabled=false",
        f"model.preset={local_run / 'model'}",
        f"tokenize.input={local_run / 'corpus'}",
        *SMALL,
    ]


if __name__ == "__main__":
    _serve_emulator(sys.argv[1:])
