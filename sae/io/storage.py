"""The one storage layer: every input and output is a URI.

A URI is a local path, ``file://path`` or ``gs://bucket/prefix``. Nothing else in the
project looks at URI schemes; it calls these functions. Local writes are atomic
(temp file + ``os.replace``), GCS writes are single object uploads (atomic on GCS).
Every failure a user can cause (missing file or bucket, no permission, unreachable
endpoint) is raised as a one-line :class:`sae.errors.StorageError` naming the URI.

Emulator support: when ``STORAGE_EMULATOR_HOST`` is set, the google-cloud-storage
client talks to it with anonymous credentials, and :func:`orbax_path` points gcsfs
and tensorstore (the two libraries Orbax writes through) at it too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sae.errors import InputError, StorageError

if TYPE_CHECKING:
    from etils import epath
    from google.cloud import storage as gcs


def _configure_gcs_env() -> None:
    """Set env defaults that must be in place before etils/gcsfs/tensorstore read them."""
    # etils' epath picks TensorFlow's gfile for gs:// when TF is installed (keras-hub
    # pulls it in); gfile cannot reach an emulator, gcsfs can (and is what we test).
    os.environ.setdefault("EPATH_USE_TF", "false")
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    # tensorstore (Orbax's array writer) ignores STORAGE_EMULATOR_HOST; it has its own
    # endpoint override. It still sends an OAuth token: GOOGLE_AUTH_TOKEN_FOR_TESTING
    # makes it use this fixed token instead of probing ADC files / the GCE metadata
    # server (without it, it logs an error and falls back to anonymous requests).
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", _with_scheme(host))
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # gcsfs' "extended" filesystem asks the gRPC Storage Control API for the bucket
    # layout; an emulator has no such API (it only warns, but with real ADC credentials
    # it would dial storage.googleapis.com). Read when gcsfs is first imported.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _with_scheme(host: str) -> str:
    return host if "://" in host else f"http://{host}"


_configure_gcs_env()

_GS = "gs://"
_FILE = "file://"
_CHUNK = 1 << 20
_WORKERS = 8
# (connect, read) seconds per HTTP request; a dead endpoint is noticed in seconds.
_TIMEOUT = (10.0, 120.0)
_PROBE_TIMEOUT = (3.0, 5.0)
# Total seconds spent retrying transient errors (503, resets) on ordinary operations.
_RETRY_DEADLINE_S = float(os.environ.get("GEMMA_SAE_GCS_RETRY_S", "60"))


# ---------------------------------------------------------------------------------
# URI helpers
# ---------------------------------------------------------------------------------


def is_gcs(uri: str) -> bool:
    """True for ``gs://`` URIs."""
    return str(uri).startswith(_GS)


def _check_scheme(uri: str) -> None:
    if "://" in uri and not uri.startswith((_GS, _FILE)):
        raise StorageError(f"unsupported URI {uri}: use a local path, file:// or gs://")


def _local_path(uri: str | os.PathLike[str]) -> Path:
    uri = os.fspath(uri)
    _check_scheme(uri)
    return Path(uri.removeprefix(_FILE)).expanduser()


def tensorstore_kvstore(uri: str) -> dict[str, str]:
    """tensorstore's address of a directory URI (gs:// reaches an emulator through
    TENSORSTORE_GCS_HTTP_URL, set above)."""
    if is_gcs(uri):
        bucket, path = _split(uri)
        return {"driver": "gcs", "bucket": bucket, "path": path.rstrip("/") + "/"}
    return {"driver": "file", "path": str(_local_path(uri).absolute()) + "/"}


def _split(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b")."""
    bucket, _, key = uri[len(_GS) :].partition("/")
    if not bucket:
        raise StorageError(f"invalid URI {uri}: missing bucket name")
    return bucket, key.strip("/")


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a URI; parts never escape ``base`` (leading '/' ignored)."""
    base = os.fspath(base)
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *clean]) if clean else base
    _check_scheme(base)
    scheme = _FILE if base.startswith(_FILE) else ""
    return scheme + os.path.join(base.removeprefix(_FILE), *clean)


def parent(uri: str) -> str:
    """The containing directory (``gs://bucket`` is its own parent)."""
    if is_gcs(uri):
        bucket, key = _split(uri)
        return f"{_GS}{bucket}/{key.rsplit('/', 1)[0]}" if "/" in key else f"{_GS}{bucket}"
    scheme = _FILE if uri.startswith(_FILE) else ""
    path = uri.removeprefix(_FILE)
    return scheme + (os.path.dirname(path.rstrip("/") or "/") or ".")


def basename(uri: str) -> str:
    """The last path component (trailing '/' ignored)."""
    if is_gcs(uri):
        bucket, key = _split(uri)
        return key.rsplit("/", 1)[-1] if key else bucket
    return os.path.basename(uri.removeprefix(_FILE).rstrip("/"))


# ---------------------------------------------------------------------------------
# GCS client, retries and error conversion
# ---------------------------------------------------------------------------------


def _endpoint() -> str:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    return _with_scheme(host) if host else "https://storage.googleapis.com"


@functools.lru_cache(maxsize=4)
def _client_for(emulator_host: str | None) -> gcs.Client:
    from google.cloud import storage

    if emulator_host:
        # The client reads STORAGE_EMULATOR_HOST itself for the endpoint.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="test", credentials=AnonymousCredentials())
    return storage.Client()


def _client(uri: str) -> gcs.Client:
    """One cached client per endpoint, so tests may repoint STORAGE_EMULATOR_HOST."""
    try:
        return _client_for(os.environ.get("STORAGE_EMULATOR_HOST") or None)
    except Exception as exc:  # DefaultCredentialsError and friends
        raise _to_storage_error(exc, uri, "access") from None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes/contexts and exceptions wrapped in args (urllib3 style)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or len(seen) > 20:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), getattr(e, "cause", None)]
        todo += [a for a in e.args if isinstance(a, BaseException)]


def _is_unreachable(exc: BaseException) -> bool:
    """Connection refused / unknown host: retrying cannot help, fail at once."""
    from urllib3.exceptions import NewConnectionError

    return any(isinstance(e, NewConnectionError | ConnectionRefusedError) for e in _causes(exc))


def _is_network_error(exc: BaseException) -> bool:
    import requests
    from google.auth.exceptions import TransportError

    kinds = (requests.ConnectionError, requests.Timeout, TransportError, ConnectionError)
    return any(isinstance(e, kinds) for e in _causes(exc))


def _is_transient(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    http = (
        gexc.TooManyRequests,
        gexc.InternalServerError,
        gexc.BadGateway,
        gexc.ServiceUnavailable,
        gexc.GatewayTimeout,
    )
    return isinstance(exc, http) or (_is_network_error(exc) and not _is_unreachable(exc))


def _is_transient_http(exc: BaseException) -> bool:
    return _is_transient(exc) and not _is_network_error(exc)


@functools.cache
def _retry() -> Any:
    """Ordinary operations: retry 429/5xx and dropped connections, never 'refused'."""
    from google.api_core.retry import Retry

    return Retry(predicate=_is_transient, initial=0.5, maximum=8.0, timeout=_RETRY_DEADLINE_S)


@functools.cache
def _probe_retry() -> Any:
    """check_writable: only retry server hiccups, for a few seconds; a dead endpoint fails now."""
    from google.api_core.retry import Retry

    return Retry(predicate=_is_transient_http, initial=0.2, maximum=2.0, timeout=8.0)


def _network_reason(exc: BaseException) -> str:
    text = " ".join(str(e) for e in _causes(exc))
    for needle, reason in (
        ("refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("NameResolution", "unknown host"),
        ("Failed to resolve", "unknown host"),
        ("timed out", "timed out"),
        ("Timeout", "timed out"),
    ):
        if needle in text:
            return reason
    return _one_line(str(exc))


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bucket_missing(bucket: str, uri: str) -> bool:
    try:
        return not _client(uri).bucket(bucket).exists(retry=_probe_retry(), timeout=_PROBE_TIMEOUT)
    except Exception:
        return False


def _to_storage_error(exc: BaseException, uri: str, action: str) -> StorageError:
    """Turn any google/requests/auth exception into one line naming the URI."""
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, gexc.RetryError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, DefaultCredentialsError):
        return StorageError(
            f"cannot {action} {uri}: no Google Cloud credentials found (run "
            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if isinstance(exc, gexc.NotFound):
        bucket = _split(uri)[0] if is_gcs(uri) else ""
        if bucket and _bucket_missing(bucket, uri):
            return StorageError(f"cannot reach bucket '{bucket}' ({uri}): bucket does not exist")
        return StorageError(f"cannot {action} {uri}: no such file")
    if isinstance(exc, gexc.Forbidden | gexc.Unauthorized):
        return StorageError(f"cannot {action} {uri}: permission denied ({_api_message(exc)})")
    if isinstance(exc, gexc.GoogleAPICallError):
        return StorageError(f"cannot {action} {uri}: {_api_message(exc)}")
    if _is_network_error(exc):
        return StorageError(
            f"cannot reach storage at {_endpoint()} for {uri}: {_network_reason(exc)}"
        )
    return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {_one_line(str(exc))}")


def _api_message(exc: Any) -> str:
    message = getattr(exc, "message", "") or str(exc)
    # The client prefixes the request line ("GET http://...: "); keep only the reason.
    message = re.sub(r"^[A-Z]+ https?://\S+: ", "", str(message))
    return _one_line(f"{exc.code} {message}" if getattr(exc, "code", None) else message)


@functools.cache
def _gcs_error_kinds() -> tuple[type[BaseException], ...]:
    """Everything the GCS stack raises for a failed request."""
    import requests
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError
    from google.cloud.storage import exceptions as storage_exc

    return (
        GoogleAPIError,
        GoogleAuthError,
        requests.RequestException,
        storage_exc.InvalidResponse,
        storage_exc.DataCorruption,
        ConnectionError,
    )


@contextlib.contextmanager
def _gcs_errors(uri: str, action: str) -> Iterator[None]:
    """Convert exceptions from the GCS stack raised inside the block."""
    try:
        yield
    except _gcs_error_kinds() as exc:
        raise _to_storage_error(exc, uri, action) from None


@contextlib.contextmanager
def _local_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise StorageError(f"cannot {action} {uri}: no such file or directory") from None
    except IsADirectoryError:
        raise StorageError(f"cannot {action} {uri}: is a directory") from None
    except NotADirectoryError:
        raise StorageError(f"cannot {action} {uri}: a parent is not a directory") from None
    except PermissionError:
        raise StorageError(f"cannot {action} {uri}: permission denied") from None
    except OSError as exc:
        raise StorageError(f"cannot {action} {uri}: {exc.strerror or exc}") from None


def _blob(uri: str) -> gcs.Blob:
    bucket, key = _split(uri)
    if not key:
        raise StorageError(f"invalid URI {uri}: names a bucket, not a file")
    return _client(uri).bucket(bucket).blob(key)


def _list_raw(uri: str, prefix: str) -> list[gcs.Blob]:
    """Objects whose name starts with ``prefix`` ('dir/' placeholders skipped); raw errors."""
    blobs = _client(uri).list_blobs(_split(uri)[0], prefix=prefix, retry=_retry(), timeout=_TIMEOUT)
    return [b for b in blobs if not b.name.endswith("/")]


def _blobs_below(uri: str) -> list[gcs.Blob]:
    """Every object under the directory ``uri``."""
    key = _split(uri)[1]
    with _gcs_errors(uri, "list"):
        return _list_raw(uri, f"{key}/" if key else "")


def _get_blob(uri: str, action: str) -> gcs.Blob:
    """The blob with its metadata loaded (size, md5); StorageError if it is missing."""
    blob = _blob(uri)
    with _gcs_errors(uri, action):
        blob.reload(retry=_retry(), timeout=_TIMEOUT)
    return blob


# ---------------------------------------------------------------------------------
# Whole-object reads and writes
# ---------------------------------------------------------------------------------


def _temp_sibling(path: Path) -> Path:
    # Same directory so os.replace is an atomic rename; hidden so globs rarely see it.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _remove_quietly(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _atomic_local_file(uri: str) -> Iterator[IO[bytes]]:
    """Write to a temp file next to the target; rename over it only on success.

    Only our own file operations are converted to StorageError: an unrelated error
    raised by the caller inside the block must not be blamed on ``uri``.
    """
    path = _local_path(uri)
    tmp = _temp_sibling(path)
    with _local_errors(uri, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "xb")  # noqa: SIM115 - closed below
    try:
        with f:
            yield f
        with _local_errors(uri, "write"):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_bytes(uri: str) -> bytes:
    """The whole content of a file."""
    if is_gcs(uri):
        blob = _blob(uri)
        with _gcs_errors(uri, "read"):
            return blob.download_as_bytes(retry=_retry(), timeout=_TIMEOUT)
    with _local_errors(uri, "read"):
        return _local_path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Replace a file's content atomically (creating parent directories)."""
    if is_gcs(uri):
        blob = _blob(uri)
        with _gcs_errors(uri, "write"):
            blob.upload_from_string(data, retry=_retry(), timeout=_TIMEOUT)
        return
    with _atomic_local_file(uri) as f, _local_errors(uri, "write"):
        f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    """Parse a JSON file; malformed content is an InputError naming the URI."""
    try:
        return json.loads(read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot parse JSON in {uri}: {_one_line(str(exc))}") from None


def write_json(uri: str, obj: Any) -> None:
    """Stable, diff-friendly JSON (indent=2, sorted keys)."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A seekable binary reader (for pyarrow/Parquet); GCS is read in ranged chunks."""
    if not is_gcs(uri):
        with _local_errors(uri, "read"):
            f = open(_local_path(uri), "rb")  # noqa: SIM115 - closed below
        with f:
            yield f
        return
    blob = _get_blob(uri, "read")  # pins the generation and gives seek(0, 2) a size
    with _gcs_errors(uri, "read"), blob.open("rb", retry=_retry(), timeout=_TIMEOUT) as f:
        yield f


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[IO[bytes]]:
    """A binary writer; the file appears only if the block finishes without error."""
    if not is_gcs(uri):
        with _atomic_local_file(uri) as f:
            yield f
        return
    blob = _blob(uri)
    with _gcs_errors(uri, "write"):
        # ignore_flush: pyarrow calls flush(), which a resumable upload cannot honour.
        writer = blob.open("wb", ignore_flush=True, retry=_retry(), timeout=_TIMEOUT)
    try:
        yield writer
    except BaseException as exc:
        # Cancel the resumable upload so no partial object is ever finalised.
        with contextlib.suppress(Exception):
            writer.terminate()
        if isinstance(exc, _gcs_error_kinds()):  # a chunk upload failed mid-stream
            raise _to_storage_error(exc, uri, "write") from None
        raise
    with _gcs_errors(uri, "write"):
        writer.close()


# ---------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------


def exists(uri: str) -> bool:
    """True if ``uri`` is a file or a non-empty directory (or an existing bucket)."""
    if not is_gcs(uri):
        return _local_path(uri).exists()
    bucket, key = _split(uri)
    if not key:
        with _gcs_errors(uri, "check"):
            return _client(uri).bucket(bucket).exists(retry=_retry(), timeout=_TIMEOUT)
    with _gcs_errors(uri, "check"):
        if _blob(uri).exists(retry=_retry(), timeout=_TIMEOUT):
            return True
    return is_dir(uri)


def is_dir(uri: str) -> bool:
    """Local: a directory. GCS: some object lives under ``uri + '/'`` (or a bucket root)."""
    if not is_gcs(uri):
        return _local_path(uri).is_dir()
    from google.api_core.exceptions import NotFound

    bucket, key = _split(uri)
    client = _client(uri)
    with _gcs_errors(uri, "check"):
        if not key:
            return client.bucket(bucket).exists(retry=_retry(), timeout=_TIMEOUT)
        try:
            blobs = client.list_blobs(
                bucket, prefix=f"{key}/", max_results=1, retry=_retry(), timeout=_TIMEOUT
            )
            return any(True for _ in blobs)
        except NotFound:  # missing bucket: nothing is a directory there
            return False


def list_files(uri: str) -> list[str]:
    """Full URIs of all files below a directory, recursively, sorted ([] if none)."""
    if is_gcs(uri):
        bucket = _split(uri)[0]
        return sorted(f"{_GS}{bucket}/{b.name}" for b in _blobs_below(uri))
    root = _local_path(uri)
    return sorted(join(uri, rel) for rel in _local_relpaths(root))


def _local_relpaths(root: Path, max_segments: int | None = None) -> list[str]:
    """'/'-separated paths of the files below ``root``, optionally of at most N segments."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        depth = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
        if max_segments is not None and depth + 1 >= max_segments:
            dirnames.clear()  # files in subdirectories would have too many segments
        for name in filenames:
            out.append(name if rel_dir == "." else Path(rel_dir, name).as_posix())
    return sorted(out)


def size(uri: str) -> int:
    """File size in bytes."""
    if is_gcs(uri):
        return int(_get_blob(uri, "stat").size or 0)
    with _local_errors(uri, "stat"):
        return _local_path(uri).stat().st_size


# ---------------------------------------------------------------------------------
# Glob
# ---------------------------------------------------------------------------------

_WILDCARD = re.compile(r"[*?\[]")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*``/``?`` stay within one path segment, ``**`` spans any number, ``[...]`` a class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob(pattern: str) -> list[str]:
    """Files matching ``pattern`` (``*``, ``?``, ``[...]``, ``**``), sorted full URIs."""
    if is_gcs(pattern):
        return _glob_gcs(pattern)
    scheme = _FILE if pattern.startswith(_FILE) else ""
    path = str(_local_path(pattern))
    match = _WILDCARD.search(path)
    if match is None:
        return [scheme + path] if os.path.isfile(path) else []
    base = os.path.dirname(path[: match.start()])  # deepest wildcard-free directory
    rest = path[len(base) :].lstrip("/")
    # Without '**' a match has as many segments as the pattern: don't walk deeper.
    depth = None if "**" in rest else rest.count("/") + 1
    regex = _glob_regex(path)
    found = (os.path.join(base, rel) for rel in _local_relpaths(Path(base or "."), depth))
    return sorted(scheme + p for p in found if regex.match(p))


def match_files(spec: str) -> list[str]:
    """Files named by a URI, glob or directory, or a comma-separated list of them: sorted,
    each once, possibly none. A directory gives its files less stage bookkeeping (a
    manifest.json, markers like _SUCCESS, hidden files)."""
    files: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        files.extend(glob(part) if _WILDCARD.search(part) else _files_at(part))
    return sorted(dict.fromkeys(files))


def _files_at(uri: str) -> list[str]:
    if is_dir(uri):
        return [f for f in list_files(uri) if not _is_bookkeeping(basename(f))]
    return [uri] if exists(uri) else []


def _is_bookkeeping(name: str) -> bool:
    return name == "manifest.json" or name.startswith(("_", "."))


def _glob_gcs(pattern: str) -> list[str]:
    bucket, key = _split(pattern)
    match = _WILDCARD.search(key)
    if match is None:
        return [pattern] if _blob(pattern).exists(retry=_retry(), timeout=_TIMEOUT) else []
    prefix = key[: match.start()]  # list by the longest literal prefix, filter locally
    regex = _glob_regex(key)
    with _gcs_errors(pattern, "list"):
        names = [b.name for b in _list_raw(pattern, prefix)]
    return sorted(f"{_GS}{bucket}/{n}" for n in names if regex.match(n))


# ---------------------------------------------------------------------------------
# Deletion
# ---------------------------------------------------------------------------------


def delete(uri: str) -> None:
    """Delete one file; a missing file is not an error (idempotent re-runs)."""
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        blob = _blob(uri)
        with _gcs_errors(uri, "delete"), contextlib.suppress(NotFound):
            blob.delete(retry=_retry(), timeout=_TIMEOUT)
        return
    path = _local_path(uri)
    if path.is_dir():
        raise StorageError(f"cannot delete {uri}: is a directory (use delete_tree)")
    with _local_errors(uri, "delete"):
        path.unlink(missing_ok=True)


def delete_tree(uri: str) -> None:
    """Delete a directory and everything below it (or a single file); missing is fine."""
    if not is_gcs(uri):
        path = _local_path(uri)
        if path.resolve() == Path(path.resolve().anchor):
            raise StorageError(f"refusing to delete the filesystem root ({uri})")
        with _local_errors(uri, "delete"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return
    key = _split(uri)[1]
    if not key:
        # A typo in a config should never be able to wipe a whole bucket.
        raise StorageError(f"refusing to delete a whole bucket ({uri}); name a prefix")
    from google.api_core.exceptions import NotFound

    def drop(blob: gcs.Blob) -> None:
        with _gcs_errors(uri, "delete"), contextlib.suppress(NotFound):
            blob.delete(retry=_retry(), timeout=_TIMEOUT)

    with _gcs_errors(uri, "delete"):
        try:
            blobs = _list_raw(uri, f"{key}/")
        except NotFound:
            return  # no bucket, so nothing to delete
    _parallel(drop, [*blobs, _blob(uri)])  # the tree, and ``uri`` itself if it is a file


def _parallel(fn: Callable[[Any], None], items: Iterable[Any]) -> None:
    """Run ``fn`` over items on a few threads (GCS calls are latency bound)."""
    items = list(items)
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with concurrent.futures.ThreadPoolExecutor(min(_WORKERS, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


# ---------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------


def _blob_fingerprint(blob: gcs.Blob) -> str:
    # GCS already stores a content hash; composite objects only have crc32c.
    return f"md5:{blob.md5_hash}" if blob.md5_hash else f"crc32c:{blob.crc32c}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def fingerprint(uri: str) -> str:
    """Content fingerprint for manifests: local ``sha256:...``, GCS ``md5:...``."""
    if is_gcs(uri):
        return _blob_fingerprint(_get_blob(uri, "fingerprint"))
    with _local_errors(uri, "fingerprint"):
        return _sha256_file(_local_path(uri))


def _tree_hash(entries: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for rel, fp in sorted(entries):
        digest.update(f"{rel}\t{fp}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def _gcs_tree(uri: str) -> tuple[list[tuple[str, gcs.Blob]], bool]:
    """(relative path, blob) of everything at ``uri`` and whether it is a directory."""
    key = _split(uri)[1]
    blobs = _blobs_below(uri)
    if blobs:
        cut = len(key) + 1 if key else 0
        return [(b.name[cut:], b) for b in blobs], True
    return [(basename(uri), _get_blob(uri, "read"))], False


def fingerprint_tree(uri: str) -> str:
    """One hash over (relative path, fingerprint) of every file below a directory.

    A single file gives the hash of its own (basename, fingerprint) entry.
    """
    if is_gcs(uri):
        tree, _ = _gcs_tree(uri)
        return _tree_hash((rel, _blob_fingerprint(b)) for rel, b in tree)
    root = _local_path(uri)
    if root.is_file():
        return _tree_hash([(root.name, fingerprint(uri))])
    if not root.is_dir():
        raise StorageError(f"cannot fingerprint {uri}: no such file or directory")
    with _local_errors(uri, "fingerprint"):
        return _tree_hash((rel, _sha256_file(root / rel)) for rel in _local_relpaths(root))


# ---------------------------------------------------------------------------------
# Tree transfer and the local cache
# ---------------------------------------------------------------------------------


def _download_blob(blob: gcs.Blob, dest: Path, uri: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dest)
    try:
        with _gcs_errors(uri, "download"):
            blob.download_to_filename(str(tmp), retry=_retry(), timeout=_TIMEOUT)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_tree(uri: str, local_dir: str | os.PathLike[str]) -> None:
    """Copy every file below directory ``uri`` into ``local_dir`` (same relative paths)."""
    dest = Path(local_dir)
    if not is_gcs(uri):
        with _local_errors(uri, "copy"):
            shutil.copytree(_local_path(uri), dest, dirs_exist_ok=True)
        return
    key = _split(uri)[1]
    blobs = _blobs_below(uri)
    if not blobs:
        raise StorageError(f"cannot download {uri}: no files below it")
    cut = len(key) + 1 if key else 0
    _parallel(lambda b: _download_blob(b, dest / b.name[cut:], uri), blobs)


def upload_tree(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy every file below ``local_dir`` to ``uri`` (same relative paths)."""
    src = Path(local_dir)
    if not src.is_dir():
        raise StorageError(f"cannot upload {src}: not a directory")
    if not is_gcs(uri):
        with _local_errors(uri, "copy"):
            shutil.copytree(src, _local_path(uri), dirs_exist_ok=True)
        return

    def put(rel: str) -> None:
        target = join(uri, rel)
        blob = _blob(target)
        with _gcs_errors(target, "upload"):
            blob.upload_from_filename(str(src / rel), retry=_retry(), timeout=_TIMEOUT)

    _parallel(put, _local_relpaths(src))


def _cache_root() -> Path:
    root = os.environ.get("GEMMA_SAE_CACHE") or "~/.cache/gemma-sae"
    return Path(root).expanduser()


def local_copy(uri: str) -> Path:
    """A local path holding ``uri``'s content: the path itself, or a cached GCS download.

    Needed for libraries that cannot read gs:// through our client (keras-hub goes
    through tf.io.gfile, which cannot reach an emulator). The cache lives at
    ``$GEMMA_SAE_CACHE/gcs/<bucket>/<path>`` (default ~/.cache/gemma-sae) and is
    refreshed only when the remote fingerprint_tree changes.
    """
    if not is_gcs(uri):
        return _local_path(uri)
    bucket, key = _split(uri)
    dest = _cache_root() / "gcs" / bucket / key
    stamp = dest.with_name(dest.name + ".stamp")  # beside, not inside, the copy
    tree, is_directory = _gcs_tree(uri)
    fp = _tree_hash((rel, _blob_fingerprint(b)) for rel, b in tree)
    if dest.exists() and stamp.is_file() and stamp.read_text() == fp:
        return dest
    with _local_errors(str(dest), "write"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            if is_directory:
                _parallel(lambda item: _download_blob(item[1], tmp / item[0], uri), tree)
            else:
                _download_blob(tree[0][1], tmp, uri)
            stamp.unlink(missing_ok=True)  # never a valid stamp beside a half-swapped copy
            _remove_quietly(dest)
            os.replace(tmp, dest)
        finally:
            _remove_quietly(tmp)
        write_text(str(stamp), fp)
    return dest


# ---------------------------------------------------------------------------------
# Preflight and Orbax
# ---------------------------------------------------------------------------------


def check_writable(uri: str) -> None:
    """Fail fast, before any work, if outputs cannot be written under ``uri``."""
    if not is_gcs(uri):
        path = _local_path(uri)
        with _local_errors(uri, "write"):
            path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise StorageError(f"cannot write {uri}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write {uri}: permission denied")
        return
    from google.api_core.exceptions import NotFound

    bucket_name = _split(uri)[0]
    bucket = _client(uri).bucket(bucket_name)
    # testIamPermissions needs no bucket-level role (unlike buckets.get, which
    # objectAdmin lacks), 404s for a missing bucket and reports what we may do.
    with _gcs_errors(uri, "write"):
        try:
            granted = bucket.test_iam_permissions(
                ["storage.objects.create"], retry=_probe_retry(), timeout=_PROBE_TIMEOUT
            )
        except NotFound:
            raise StorageError(
                f"cannot reach bucket '{bucket_name}' ({uri}): bucket does not exist"
            ) from None
    if "storage.objects.create" not in granted:
        raise StorageError(
            f"cannot write {uri}: permission denied "
            f"(no storage.objects.create on bucket '{bucket_name}')"
        )


def orbax_path(uri: str) -> epath.Path:
    """A path Orbax's CheckpointManager can use as its directory.

    gs:// goes through etils -> gcsfs (metadata, small files) and tensorstore (arrays).
    Against an emulator both need to be pointed at it; see _configure_gcs_env.
    """
    _configure_gcs_env()  # again: STORAGE_EMULATOR_HOST may have been set since import
    from etils import epath

    if is_gcs(uri):
        return epath.Path(uri)
    return epath.Path(_local_path(uri).absolute())  # Orbax requires absolute paths
