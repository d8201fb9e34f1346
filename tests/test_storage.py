"""sae.io.storage on local paths and on a real GCS emulator process."""

import http.server
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sae.errors import InputError, StorageError
from sae.io import storage

from .conftest import local_http_server


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh directory URI: a tmp path, or a unique prefix on the emulator."""
    if request.param == "gcs":
        return request.getfixturevalue("gcs_bucket_uri")
    return str(tmp_path / "root")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _assert_one_line(err: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


# --- URI helpers ---------------------------------------------------------------------


def test_uri_helpers() -> None:
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/x")
    assert not storage.is_gcs("file:///tmp/x")
    assert storage.join("gs://b", "a", "/c/") == "gs://b/a/c"
    assert storage.join("gs://b/p/", "x.json") == "gs://b/p/x.json"
    assert storage.join("/tmp/a", "b", "c.txt") == "/tmp/a/b/c.txt"
    assert storage.join("/tmp/a", "/etc") == "/tmp/a/etc"  # parts never escape base
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.parent("gs://b/a/c") == "gs://b/a"
    assert storage.parent("gs://b/a") == "gs://b"
    assert storage.parent("/tmp/a/c/") == "/tmp/a"
    assert storage.parent("file:///tmp/a") == "file:///tmp"
    assert storage.basename("gs://b/a/c.txt") == "c.txt"
    assert storage.basename("/tmp/a/dir/") == "dir"


def test_unsupported_scheme_is_one_line() -> None:
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bucket/x")
    _assert_one_line(err, "s3://bucket/x", "unsupported")


def test_file_scheme_is_local(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/x.txt"
    storage.write_text(uri, "hi")
    assert (tmp_path / "x.txt").read_text() == "hi"
    assert storage.read_text(uri) == "hi"
    assert storage.local_copy(uri) == tmp_path / "x.txt"


# --- reads and writes ----------------------------------------------------------------


def test_roundtrip_bytes_text_json(root: str) -> None:
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01data")
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01data"
    storage.write_text(storage.join(root, "t.txt"), "héllo\n")
    assert storage.read_text(storage.join(root, "t.txt")) == "héllo\n"
    obj = {"z": [1, 2.5, None], "a": {"k": "v"}}
    storage.write_json(storage.join(root, "m.json"), obj)
    assert storage.read_json(storage.join(root, "m.json")) == obj
    # indent=2 + sorted keys: stable, diffable manifests.
    text = storage.read_text(storage.join(root, "m.json"))
    assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"new")  # overwrite
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"new"


def test_conditional_write_loses_to_a_write_in_between(root: str) -> None:
    """A pointer written only if unchanged since read: local and on the emulator (which
    checks ifGenerationMatch as GCS does: tests/conftest.py)."""
    uri = storage.join(root, "pointer", "LATEST")
    data, version = storage.read_versioned(uri)
    assert (data, version) == (None, storage.ABSENT)
    storage.write_bytes_if(uri, b"run-1\n", version)  # created: nothing was there
    with pytest.raises(storage.Changed) as err:  # a second creator loses
        storage.write_bytes_if(uri, b"run-x\n", storage.ABSENT)
    _assert_one_line(err, uri, "changed since it was read")
    data, version = storage.read_versioned(uri)
    assert data == b"run-1\n"
    storage.write_bytes(uri, b"run-2\n")  # another writer, after our read
    with pytest.raises(storage.Changed):
        storage.write_bytes_if(uri, b"run-3\n", version)
    assert storage.read_bytes(uri) == b"run-2\n"  # theirs stands
    data, version = storage.read_versioned(uri)
    storage.write_bytes_if(uri, b"run-3\n", version)  # read afresh, it goes through
    assert storage.read_versioned(uri)[0] == b"run-3\n"


def test_missing_file_is_one_line_storage_error(root: str) -> None:
    uri = storage.join(root, "nope.json")
    for fn in (storage.read_bytes, storage.read_json, storage.size, storage.fingerprint):
        with pytest.raises(StorageError) as err:
            fn(uri)
        _assert_one_line(err, uri)
    with pytest.raises(StorageError), storage.open_read(uri):
        pass


def test_malformed_json_is_input_error(root: str) -> None:
    storage.write_text(storage.join(root, "bad.json"), "{not json")
    with pytest.raises(InputError) as err:
        storage.read_json(storage.join(root, "bad.json"))
    _assert_one_line(err, "bad.json")


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    storage.write_json(str(target), {"v": 1})

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError) as err:
        storage.write_json(str(target), {"v": 2})
    _assert_one_line(err, str(target), "No space left")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}  # old content intact
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left behind


def test_open_write_failure_leaves_nothing(root: str) -> None:
    uri = storage.join(root, "partial.bin")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"x" * 1000)
        raise RuntimeError("caller failed mid-stream")  # not blamed on storage
    assert not storage.exists(uri)
    assert storage.list_files(root) == []


def test_parquet_streaming(root: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"tokens": [[1, 2, 3], [4, 5, 6]], "doc": [0, 1]})
    uri = storage.join(root, "shards", "part-0.parquet")
    with storage.open_write(uri) as f:
        pq.write_table(table, f)
    with storage.open_read(uri) as f:
        assert pq.ParquetFile(f).metadata.num_rows == 2
        f.seek(0)
        assert pq.read_table(f).equals(table)


# --- queries -------------------------------------------------------------------------


def _make_tree(root: str) -> None:
    for rel in ["a.txt", "b.txt", "c.json", "sub/d.txt", "sub/deep/e.txt", "subx/f.txt"]:
        storage.write_text(storage.join(root, rel), rel)


def test_list_exists_is_dir(root: str) -> None:
    assert not storage.exists(root) and not storage.is_dir(root)
    assert storage.list_files(root) == []
    _make_tree(root)
    assert storage.list_files(storage.join(root, "sub")) == [
        storage.join(root, "sub/d.txt"),
        storage.join(root, "sub/deep/e.txt"),
    ]
    assert len(storage.list_files(root)) == 6
    assert storage.exists(storage.join(root, "a.txt"))
    assert storage.exists(storage.join(root, "sub"))  # a directory exists too
    assert not storage.exists(storage.join(root, "zzz"))
    assert storage.is_dir(storage.join(root, "sub"))
    assert not storage.is_dir(storage.join(root, "a.txt"))
    assert not storage.is_dir(storage.join(root, "su"))  # a prefix is not a directory
    assert storage.size(storage.join(root, "sub/d.txt")) == len("sub/d.txt")


def test_glob(root: str) -> None:
    _make_tree(root)

    def g(pattern: str) -> list[str]:
        return [p[len(root) + 1 :] for p in storage.glob(storage.join(root, pattern))]

    assert g("*.txt") == ["a.txt", "b.txt"]
    assert g("?.json") == ["c.json"]
    assert g("[ab].txt") == ["a.txt", "b.txt"]
    assert g("sub/*.txt") == ["sub/d.txt"]
    assert g("*/*.txt") == ["sub/d.txt", "subx/f.txt"]
    assert g("**/*.txt") == ["a.txt", "b.txt", "sub/d.txt", "sub/deep/e.txt", "subx/f.txt"]
    assert g("sub/**") == ["sub/d.txt", "sub/deep/e.txt"]
    assert g("sub/**/e.txt") == ["sub/deep/e.txt"]
    assert g("a.txt") == ["a.txt"]  # no wildcard: the file if it exists
    assert g("nope.txt") == []
    assert g("*.parquet") == []


def test_relative_local_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _make_tree("data")
    assert storage.glob("data/*.txt") == ["data/a.txt", "data/b.txt"]
    assert storage.glob("data/**/e.txt") == ["data/sub/deep/e.txt"]


def test_delete_and_delete_tree(root: str) -> None:
    _make_tree(root)
    storage.delete(storage.join(root, "a.txt"))
    storage.delete(storage.join(root, "a.txt"))  # missing is fine
    assert not storage.exists(storage.join(root, "a.txt"))
    storage.delete_tree(storage.join(root, "sub"))
    assert storage.list_files(root) == [
        storage.join(root, p) for p in ["b.txt", "c.json", "subx/f.txt"]
    ]
    storage.delete_tree(storage.join(root, "sub"))  # already gone: fine
    storage.delete_tree(root)
    assert storage.list_files(root) == [] and not storage.exists(root)


@pytest.mark.gcs
def test_delete_tree_refuses_bucket_root(gcs_emulator) -> None:
    with pytest.raises(StorageError, match="whole bucket"):
        storage.delete_tree(f"gs://{gcs_emulator.bucket}")


# --- fingerprints --------------------------------------------------------------------


def test_fingerprints_follow_content(root: str) -> None:
    a, b = storage.join(root, "d", "a.bin"), storage.join(root, "d", "b.bin")
    storage.write_bytes(a, b"one")
    storage.write_bytes(b, b"one")
    fp = storage.fingerprint(a)
    assert fp == storage.fingerprint(b)  # same content, same fingerprint
    assert fp.startswith("md5:" if storage.is_gcs(root) else "sha256:")
    tree = storage.fingerprint_tree(storage.join(root, "d"))
    storage.write_bytes(a, b"two")
    assert storage.fingerprint(a) != fp
    tree2 = storage.fingerprint_tree(storage.join(root, "d"))
    assert tree2 != tree
    storage.write_bytes(storage.join(root, "d", "c.bin"), b"two")  # a new file counts
    assert storage.fingerprint_tree(storage.join(root, "d")) != tree2
    with pytest.raises(StorageError):
        storage.fingerprint_tree(storage.join(root, "missing"))


# --- tree transfer and local cache ---------------------------------------------------


def _write_local_tree(d: Path) -> None:
    (d / "nested").mkdir(parents=True)
    (d / "config.json").write_text('{"x": 1}')
    (d / "nested" / "weights.bin").write_bytes(os.urandom(3000))


def test_upload_download_tree(root: str, tmp_path: Path) -> None:
    src, back = tmp_path / "src", tmp_path / "back"
    _write_local_tree(src)
    storage.upload_tree(src, storage.join(root, "preset"))
    assert storage.list_files(storage.join(root, "preset")) == [
        storage.join(root, "preset", "config.json"),
        storage.join(root, "preset", "nested", "weights.bin"),
    ]
    storage.download_tree(storage.join(root, "preset"), back)
    for rel in ["config.json", "nested/weights.bin"]:
        assert (back / rel).read_bytes() == (src / rel).read_bytes()


@pytest.mark.gcs
def test_local_copy_downloads_once(
    gcs_bucket_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_SAE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    _write_local_tree(src)
    uri = storage.join(gcs_bucket_uri, "preset")
    storage.upload_tree(src, uri)

    local = storage.local_copy(uri)
    assert local.is_relative_to(tmp_path / "cache" / "gcs")
    assert (local / "config.json").read_text() == '{"x": 1}'
    (local / "marker").write_text("still the same copy")
    assert storage.local_copy(uri) == local
    assert (local / "marker").exists()  # unchanged remote: nothing re-downloaded

    storage.write_text(storage.join(uri, "config.json"), '{"x": 2}')
    assert storage.local_copy(uri) == local
    assert (local / "config.json").read_text() == '{"x": 2}'
    assert not (local / "marker").exists()  # changed remote: a fresh copy

    one = storage.local_copy(storage.join(uri, "config.json"))  # a single file works too
    assert one.is_file() and one.read_text() == '{"x": 2}'


def test_local_copy_of_local_path_is_itself(tmp_path: Path) -> None:
    assert storage.local_copy(str(tmp_path)) == tmp_path


# --- preflight -----------------------------------------------------------------------


def test_check_writable_local(tmp_path: Path) -> None:
    storage.check_writable(str(tmp_path / "new" / "out"))
    assert (tmp_path / "new" / "out").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError) as err:
        storage.check_writable(str(tmp_path / "file" / "out"))
    _assert_one_line(err, str(tmp_path / "file" / "out"))


@pytest.mark.gcs
def test_check_writable_gcs(gcs_bucket_uri: str) -> None:
    storage.check_writable(gcs_bucket_uri)


@pytest.mark.gcs
def test_check_writable_missing_bucket(gcs_emulator) -> None:
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.check_writable("gs://no-such-bucket-7f3a/out")
    _assert_one_line(err, "'no-such-bucket-7f3a'", "gs://no-such-bucket-7f3a/out", "not exist")
    assert time.monotonic() - start < 5
    with pytest.raises(StorageError) as err:
        storage.read_bytes("gs://no-such-bucket-7f3a/x.json")
    _assert_one_line(err, "bucket does not exist")


def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # No emulator needed: a closed port on localhost refuses connections.
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    for call in (
        lambda: storage.check_writable("gs://b/x"),
        lambda: storage.read_bytes("gs://b/x"),
        lambda: storage.list_files("gs://b/x"),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        assert time.monotonic() - start < 5
        _assert_one_line(err, f"cannot reach storage at {url} for gs://b/x: connection refused")


class _ScriptedGcs(http.server.BaseHTTPRequestHandler):
    """Answers each GET with the next (status, body) of ``script`` (the last one repeats)."""

    script: list[tuple[int, bytes]] = []
    calls = 0

    def do_GET(self) -> None:
        status, body = self.script[min(type(self).calls, len(self.script) - 1)]
        type(self).calls += 1
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted_gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_ScriptedGcs]]:
    """A fake GCS endpoint for what the emulator never does: fail with 503 or 403."""
    handler = type("Handler", (_ScriptedGcs,), {"script": [], "calls": 0})
    with local_http_server(handler) as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        yield handler


def test_transient_errors_are_retried(scripted_gcs: type[_ScriptedGcs]) -> None:
    scripted_gcs.script = [(503, b"busy"), (503, b"busy"), (200, b"content")]
    assert storage.read_bytes("gs://b/x") == b"content"
    assert scripted_gcs.calls == 3


def test_retries_stop_at_the_deadline(
    scripted_gcs: type[_ScriptedGcs], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "_RETRY_DEADLINE_S", 2.0)
    scripted_gcs.script = [(503, b"busy")]
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.read_bytes("gs://b/x")
    assert time.monotonic() - start < 5
    assert 2 <= scripted_gcs.calls <= 4  # 0.5s, then 1s apart: never past 2s
    _assert_one_line(err, "cannot read gs://b/x", "503")


def test_forbidden_is_one_line_permission_denied(scripted_gcs: type[_ScriptedGcs]) -> None:
    error = {"error": {"code": 403, "message": "sa@p.iam does not have storage.objects.get"}}
    scripted_gcs.script = [(403, json.dumps(error).encode())]
    with pytest.raises(StorageError) as err:
        storage.read_bytes("gs://b/x")
    _assert_one_line(err, "cannot read gs://b/x: permission denied", "storage.objects.get")
    assert scripted_gcs.calls == 1  # not retried


def test_missing_credentials_say_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(StorageError) as err:
        storage.read_bytes("gs://b/x")
    _assert_one_line(err, "gs://b/x", "no Google Cloud credentials found")


@pytest.mark.gcs
def test_emulator_env_reaches_subprocess(gcs_emulator, gcs_bucket_uri: str) -> None:
    storage.write_text(storage.join(gcs_bucket_uri, "hello.txt"), "from parent")
    code = "import sys; from sae.io import storage; print(storage.read_text(sys.argv[1]))"
    env = {**os.environ, **gcs_emulator.env}
    out = subprocess.run(
        [sys.executable, "-c", code, storage.join(gcs_bucket_uri, "hello.txt")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "from parent"


# --- Orbax ---------------------------------------------------------------------------


def test_orbax_checkpoint_roundtrip(root: str) -> None:
    """The training checkpoint path: Orbax -> etils/gcsfs + tensorstore -> emulator."""
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    directory = storage.orbax_path(storage.join(root, "x", "ckpt"))
    state = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
    meta = {"step": 2, "tokens": 123}
    options = ocp.CheckpointManagerOptions(max_to_keep=1)  # exercises deletion too
    with ocp.CheckpointManager(directory, options=options) as mgr:
        for step in (1, 2):
            state = {**state, "w": state["w"] + step}
            mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
        mgr.wait_until_finished()

    with ocp.CheckpointManager(storage.orbax_path(storage.join(root, "x", "ckpt"))) as mgr:
        assert mgr.all_steps() == [2]
        restored = mgr.restore(
            2,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()
            ),
        )
    assert restored["meta"] == meta
    for key in state:
        assert restored["state"][key].dtype == state[key].dtype
        np.testing.assert_array_equal(np.asarray(restored["state"][key]), state[key])
    assert storage.is_dir(storage.join(root, "x", "ckpt", "2"))
    assert not storage.is_dir(storage.join(root, "x", "ckpt", "1"))


_ORBAX_CHILD = """
import sys
import jax.numpy as jnp
import orbax.checkpoint as ocp  # imported before sae.io.storage on purpose
from sae.io import storage

tree = {"w": jnp.arange(4.0)}
with ocp.CheckpointManager(storage.orbax_path(sys.argv[1])) as mgr:
    mgr.save(7, args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()
with ocp.CheckpointManager(storage.orbax_path(sys.argv[1])) as mgr:
    out = mgr.restore(7, args=ocp.args.StandardRestore(tree))
print(out["w"].tolist())
"""


@pytest.mark.gcs
def test_orbax_needs_only_emulator_host(gcs_emulator, gcs_bucket_uri: str) -> None:
    """orbax_path derives the tensorstore/etils/gcsfs settings from STORAGE_EMULATOR_HOST."""
    env = {k: v for k, v in os.environ.items() if k not in gcs_emulator.env}
    env["STORAGE_EMULATOR_HOST"] = gcs_emulator.url
    out = subprocess.run(
        [sys.executable, "-c", _ORBAX_CHILD, storage.join(gcs_bucket_uri, "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0.0, 1.0, 2.0, 3.0]"
    assert storage.is_dir(storage.join(gcs_bucket_uri, "ckpt", "7"))
