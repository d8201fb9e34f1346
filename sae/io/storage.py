"""The one storage layer: every input and output is a URI.

A URI is a local path, ``file://path`` or ``gs://bucket/prefix``. Nothing else in the
project looks at URI schemes; it calls these functions, which go through fsspec (gcsfs
for gs://). Local writes are atomic (temp file + ``os.replace``), GCS writes are single
object uploads (atomic on GCS). Every failure a user can cause (missing file or bucket,
no permission, unreachable endpoint) is raised as a one-line
:class:`sae.errors.StorageError` naming the URI.

Emulator support: when ``STORAGE_EMULATOR_HOST`` is set, gcsfs talks to it anonymously,
and :func:`orbax_path` points tensorstore (Orbax's array writer) at it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fsspec.implementations.local import LocalFileSystem

from sae.errors import InputError, StorageError

if TYPE_CHECKING:
    from etils import epath
    from fsspec import AbstractFileSystem


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
    # gcsfs' "extended" filesystem (the one etils gets) asks the gRPC Storage Control API
    # for the bucket layout; an emulator has no such API (it only warns, but with real
    # ADC credentials it would dial storage.googleapis.com). Read when gcsfs is imported.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _with_scheme(host: str) -> str:
    return host if "://" in host else f"http://{host}"


_configure_gcs_env()

_GS, _FILE = "gs://", "file://"
_LOCAL = LocalFileSystem()
_WILDCARD = re.compile(r"[*?\[]")
_CREATE = "storage.objects.create"  # the permission check_writable needs
# Total seconds one GCS request spends retrying transient errors (429/5xx, resets).
_RETRY_DEADLINE_S = float(os.environ.get("GEMMA_SAE_GCS_RETRY_S", "60"))


def is_gcs(uri: str) -> bool:
    """True for ``gs://`` URIs."""
    return str(uri).startswith(_GS)


def _local_path(uri: str | os.PathLike[str]) -> Path:
    uri = os.fspath(uri)
    if "://" in uri and not uri.startswith((_GS, _FILE)):
        raise StorageError(f"unsupported URI {uri}: use a local path, file:// or gs://")
    return Path(uri.removeprefix(_FILE)).expanduser()


def _split(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b")."""
    bucket, _, key = uri[len(_GS) :].partition("/")
    if not bucket:
        raise StorageError(f"invalid URI {uri}: missing bucket name")
    return bucket, key.strip("/")


def _resolve(uri: str, file: bool = False) -> tuple[AbstractFileSystem, str]:
    """The filesystem and its path for ``uri`` (gcsfs' "bucket/key", or an absolute path);
    ``file``: ``uri`` must name a file, so not a bucket."""
    if not is_gcs(uri):
        return _LOCAL, os.path.abspath(_local_path(uri))
    bucket, key = _split(uri)
    if file and not key:
        raise StorageError(f"invalid URI {uri}: names a bucket, not a file")
    return _gcs(uri), f"{bucket}/{key}".rstrip("/")


def tensorstore_kvstore(uri: str) -> dict[str, str]:
    """tensorstore's address of a directory URI (gs:// reaches an emulator through
    TENSORSTORE_GCS_HTTP_URL, set above)."""
    if is_gcs(uri):
        bucket, path = _split(uri)
        return {"driver": "gcs", "bucket": bucket, "path": path.rstrip("/") + "/"}
    return {"driver": "file", "path": str(_local_path(uri).absolute()) + "/"}


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a URI; parts never escape ``base`` (leading '/' ignored)."""
    base = os.fspath(base)
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *clean]) if clean else base
    _local_path(base)  # rejects other schemes
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


# --- gcsfs and errors (imported lazily: local runs never need them) ---


@functools.cache
def _gcs_class() -> type[AbstractFileSystem]:
    """gcsfs with a bounded retry: gcsfs retries any failed request 6 times over half a
    minute, refused connections included; we retry for GEMMA_SAE_GCS_RETRY_S seconds,
    and not at all when nothing listens (a dead emulator or wrong host won't come back)."""
    import aiohttp
    from gcsfs.core import GCSFileSystem
    from gcsfs.retry import is_retriable

    request = GCSFileSystem._request.__wrapped__  # without gcsfs' retry decorator

    class BoundedRetryGCSFileSystem(GCSFileSystem):
        async def _request(self, *args: Any, **kwargs: Any) -> Any:
            deadline, delay = time.monotonic() + _RETRY_DEADLINE_S, 0.5
            while True:
                try:
                    return await request(self, *args, **kwargs)
                except Exception as exc:
                    refused = isinstance(exc, aiohttp.ClientConnectorError)
                    if refused or not is_retriable(exc) or time.monotonic() + delay > deadline:
                        raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 8.0)

    return BoundedRetryGCSFileSystem


def _gcs(uri: str) -> AbstractFileSystem:
    """The gcsfs filesystem for the current endpoint (fsspec keeps one per settings)."""
    import aiohttp

    host = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        return _gcs_class()(
            endpoint_url=_with_scheme(host) if host else None,
            # gcsfs' default falls back to anonymous access: missing credentials would
            # show up later as "permission denied" instead of saying so.
            token="anon" if host else "google_default",
            use_listings_cache=False,  # other processes and hosts write the same prefixes
            # Per request: a dead endpoint is noticed in seconds, big objects still stream.
            requests_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=120),
        )
    except Exception as exc:  # DefaultCredentialsError and friends
        raise _to_storage_error(exc, uri, "access") from None


@functools.cache
def _gcs_only_errors() -> tuple[type[BaseException], ...]:
    """What gcsfs raises for a failed request besides OSError; never the caller's code."""
    import aiohttp
    from gcsfs.retry import ChecksumError, HttpError
    from google.auth.exceptions import GoogleAuthError

    return (HttpError, ChecksumError, aiohttp.ClientError, GoogleAuthError)


@contextlib.contextmanager
def _errors(uri: str, action: str, gcs_only: bool = False) -> Iterator[None]:
    """Storage errors in the block become a one-line StorageError naming ``uri`` (with
    ``gcs_only``, only gcsfs' own kinds: the block runs the caller's code too)."""
    kinds = (_gcs_only_errors() if is_gcs(uri) else ()) + (() if gcs_only else (OSError,))
    try:
        yield
    except kinds as exc:
        raise _to_storage_error(exc, uri, action) from None


_LOCAL_REASONS = {
    FileNotFoundError: "no such file or directory",
    IsADirectoryError: "is a directory",
    NotADirectoryError: "a parent is not a directory",
    PermissionError: "permission denied",
}


def _to_storage_error(exc: BaseException, uri: str, action: str) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    if not is_gcs(uri):
        reason = next((r for k, r in _LOCAL_REASONS.items() if isinstance(exc, k)), None)
        reason = reason or getattr(exc, "strerror", None) or _one_line(str(exc))
        return StorageError(f"cannot {action} {uri}: {reason}")
    import aiohttp
    from google.auth.exceptions import DefaultCredentialsError

    if isinstance(exc, DefaultCredentialsError):
        return StorageError(
            f"cannot {action} {uri}: no Google Cloud credentials found (run "
            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if isinstance(exc, FileNotFoundError):
        bucket = _split(uri)[0]
        if _bucket_missing(bucket, uri):
            return StorageError(f"cannot reach bucket '{bucket}' ({uri}): bucket does not exist")
        return StorageError(f"cannot {action} {uri}: no such file")
    # gcsfs raises a 403 as OSError("Forbidden: <url>\n<reason>"), a 401 as HttpError.
    if getattr(exc, "code", None) in (401, 403) or str(exc).startswith("Forbidden"):
        reason = getattr(exc, "message", None) or str(exc).partition("\n")[2]
        return StorageError(f"cannot {action} {uri}: permission denied ({_one_line(reason)})")
    if isinstance(exc, aiohttp.ClientConnectionError | TimeoutError):
        host = os.environ.get("STORAGE_EMULATOR_HOST")
        endpoint = _with_scheme(host) if host else "https://storage.googleapis.com"
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            reason = "unknown host"
        elif isinstance(getattr(exc, "os_error", None), ConnectionRefusedError):
            reason = "connection refused"
        else:
            reason = "timed out" if isinstance(exc, TimeoutError) else _one_line(str(exc))
        return StorageError(f"cannot reach storage at {endpoint} for {uri}: {reason}")
    return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {_one_line(str(exc))}")


def _bucket_missing(bucket: str, uri: str) -> bool:
    try:
        _gcs(uri).call("GET", "b/{}", bucket)
    except FileNotFoundError:
        return True
    except Exception:  # no permission to look, or anything else: don't guess
        return False
    return False


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- reads and writes ---


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[IO[bytes]]:
    """A binary writer; the file appears only if the block finishes without error.

    The block writes a temp file: beside a local target, then renamed over it, or for
    gs:// in the temp directory, then uploaded as one object. So a failed block leaves
    nothing behind, and the caller's own errors are never blamed on ``uri``.
    """
    fs, path = _resolve(uri, file=True)
    if is_gcs(uri):
        fd, name = tempfile.mkstemp(suffix=".upload")
        tmp, f = Path(name), os.fdopen(fd, "wb")
    else:
        # Same directory, so os.replace is an atomic rename; hidden, so globs rarely see it.
        tmp = Path(path).with_name(f".{Path(path).name}.{uuid.uuid4().hex[:8]}.tmp")
        with _errors(uri, "write"):
            tmp.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "xb")  # noqa: SIM115 - closed below
    try:
        with f:
            yield f
        with _errors(uri, "write"):
            if is_gcs(uri):
                fs.put_file(str(tmp), path)
            else:
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A seekable binary reader (for pyarrow/Parquet); GCS is read in ranged blocks."""
    fs, path = _resolve(uri, file=True)
    with _errors(uri, "read"):
        f = fs.open(path, "rb")
    with f, _errors(uri, "read", gcs_only=True):
        yield f


def read_bytes(uri: str) -> bytes:
    """The whole content of a file."""
    fs, path = _resolve(uri, file=True)
    with _errors(uri, "read"):
        return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Replace a file's content atomically (creating parent directories)."""
    if is_gcs(uri):
        fs, path = _resolve(uri, file=True)
        with _errors(uri, "write"):
            fs.pipe_file(path, data)
        return
    with open_write(uri) as f, _errors(uri, "write"):
        f.write(data)


class Changed(StorageError):
    """A conditional write found the file changed since it was read (another writer)."""


# The version of a file that does not exist: a conditional write at it creates the file only.
ABSENT = "0"


def read_versioned(uri: str) -> tuple[bytes | None, str]:
    """A file's content (None when there is none) and its version: on GCS the object's
    generation, locally its inode and modification time; ABSENT when there is no file. The
    version is what write_bytes_if checks."""
    fs, path = _resolve(uri, file=True)
    for _ in range(5):  # a write between the two looks: look again
        version = _version(fs, uri, path)
        if version == ABSENT:
            return None, ABSENT
        with _errors(uri, "read"):
            data = fs.cat_file(path)
        if _version(fs, uri, path) == version:
            return data, version
    raise StorageError(f"cannot read {uri}: it keeps changing")


def _version(fs: AbstractFileSystem, uri: str, path: str) -> str:
    if is_gcs(uri):
        fs.invalidate_cache(path)
        with _errors(uri, "read"):
            try:
                return str(fs.info(path)["generation"])
            except FileNotFoundError:
                return ABSENT
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return ABSENT
    return f"{stat.st_ino}-{stat.st_mtime_ns}"


def write_bytes_if(uri: str, data: bytes, version: str) -> None:
    """Replace a file's content only if it is still at `version` (ABSENT: only if there is
    no file), atomically: raises Changed, naming the URI, when another writer got there
    first. GCS checks the generation itself (ifGenerationMatch); locally the check and the
    rename happen under an exclusive lock on the directory."""
    fs, path = _resolve(uri, file=True)
    if is_gcs(uri):
        from urllib.parse import quote

        bucket, key = path.split("/", 1)
        upload = f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o"
        with _errors(uri, "write"):
            try:
                fs.call(
                    "POST",
                    upload,
                    uploadType="media",
                    name=key,
                    ifGenerationMatch=version,
                    data=data,
                    headers={"Content-Type": "application/octet-stream"},
                )
            except FileExistsError:  # gcsfs' reading of 412 Precondition Failed
                raise Changed(f"{uri} changed since it was read (another writer)") from None
            finally:
                fs.invalidate_cache(path)
        return
    import fcntl

    directory = Path(path).parent
    with _errors(uri, "write"):
        directory.mkdir(parents=True, exist_ok=True)
        handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _version(fs, uri, path) != version:
            raise Changed(f"{uri} changed since it was read (another writer)")
        write_bytes(uri, data)
    finally:
        os.close(handle)  # releases the lock


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


# --- queries ---


def _info(uri: str) -> dict[str, Any] | None:
    """fsspec's info ("type": "file" or "directory"), None if nothing is there."""
    fs, path = _resolve(uri)
    with _errors(uri, "check"):
        try:
            return fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None


def exists(uri: str) -> bool:
    """True if ``uri`` is a file or a non-empty directory (or an existing bucket)."""
    return _info(uri) is not None


def is_dir(uri: str) -> bool:
    """Local: a directory. GCS: some object lives under ``uri + '/'`` (or a bucket root)."""
    return (_info(uri) or {}).get("type") == "directory"


def _file_info(uri: str, action: str) -> dict[str, Any]:
    fs, path = _resolve(uri, file=True)
    with _errors(uri, action):
        info = fs.info(path)
        if is_gcs(uri) and info["type"] != "file":
            raise FileNotFoundError(path)  # a GCS "directory" is a prefix, not an object
    return info


def size(uri: str) -> int:
    """File size in bytes."""
    return int(_file_info(uri, "stat")["size"])


def _below(uri: str) -> dict[str, dict[str, Any]]:
    """{'/'-separated relative path: fsspec info} of every file below directory ``uri``."""
    fs, path = _resolve(uri)
    with _errors(uri, "list"):
        found = fs.find(path, detail=True)
    prefix = path.rstrip("/") + "/"  # find() of a file gives the file, which is not below
    return {p[len(prefix) :]: info for p, info in found.items() if p.startswith(prefix)}


def list_files(uri: str) -> list[str]:
    """Full URIs of all files below a directory, recursively, sorted ([] if none)."""
    return sorted(join(uri, rel) for rel in _below(uri))


def glob(pattern: str) -> list[str]:
    """Files matching ``pattern`` (``*``, ``?``, ``[...]``, ``**``), sorted full URIs."""
    fs, path = _resolve(pattern)
    with _errors(pattern, "list"):
        found = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
    if is_gcs(pattern) or pattern.startswith(_FILE):
        return sorted(pattern[: pattern.index("://") + 3] + p for p in found)
    # Local matches in the pattern's own form: relative for a relative pattern.
    relative = not _local_path(pattern).is_absolute()
    return sorted(os.path.relpath(p) if relative else p for p in found)


def match_files(spec: str) -> list[str]:
    """Files named by a URI, glob or directory, or a comma-separated list of them: sorted,
    each once, possibly none. A directory gives its files less stage bookkeeping (a
    manifest.json, markers like _SUCCESS, hidden files)."""
    files: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if _WILDCARD.search(part):
            files += glob(part)
        elif is_dir(part):
            names = ((f, basename(f)) for f in list_files(part))
            files += [f for f, n in names if n != "manifest.json" and n[0] not in "_."]
        elif exists(part):
            files.append(part)
    return sorted(dict.fromkeys(files))


# --- deletion ---


def delete(uri: str) -> None:
    """Delete one file; a missing file is not an error (idempotent re-runs)."""
    fs, path = _resolve(uri, file=True)
    if not is_gcs(uri) and os.path.isdir(path):
        raise StorageError(f"cannot delete {uri}: is a directory (use delete_tree)")
    with _errors(uri, "delete"), contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def delete_tree(uri: str) -> None:
    """Delete a directory and everything below it (or a single file); missing is fine."""
    if is_gcs(uri):
        if not _split(uri)[1]:
            # A typo in a config should never be able to wipe a whole bucket.
            raise StorageError(f"refusing to delete a whole bucket ({uri}); name a prefix")
        fs, path = _resolve(uri)
        with _errors(uri, "delete"), contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)  # no such prefix, or no bucket: nothing to delete
        return
    local = _local_path(uri)
    if local.resolve() == Path(local.resolve().anchor):
        raise StorageError(f"refusing to delete the filesystem root ({uri})")
    with _errors(uri, "delete"):
        if local.is_dir() and not local.is_symlink():
            shutil.rmtree(local)
        else:
            local.unlink(missing_ok=True)


# --- fingerprints ---


def _fingerprint_of(info: dict[str, Any]) -> str:
    """A file's fingerprint from its fsspec info: GCS stores a content hash already
    (composite objects only a crc32c); a local file is hashed."""
    if "md5Hash" in info or "crc32c" in info:
        return f"md5:{info['md5Hash']}" if info.get("md5Hash") else f"crc32c:{info['crc32c']}"
    digest = hashlib.sha256()
    with open(info["name"], "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def fingerprint(uri: str) -> str:
    """Content fingerprint for manifests: local ``sha256:...``, GCS ``md5:...``."""
    info = _file_info(uri, "fingerprint")
    with _errors(uri, "fingerprint"):
        return _fingerprint_of(info)


def _tree(uri: str) -> tuple[dict[str, str], bool]:
    """({relative path: fingerprint} of the files at ``uri``, whether it is a directory);
    a single file is keyed by its basename."""
    below = _below(uri)
    if below or is_dir(uri):
        with _errors(uri, "fingerprint"):
            return {rel: _fingerprint_of(info) for rel, info in below.items()}, True
    return {basename(uri): fingerprint(uri)}, False


def _tree_hash(entries: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for rel, fp in sorted(entries):
        digest.update(f"{rel}\t{fp}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def fingerprint_tree(uri: str) -> str:
    """One hash over (relative path, fingerprint) of every file below a directory.

    A single file gives the hash of its own (basename, fingerprint) entry.
    """
    return _tree_hash(_tree(uri)[0].items())


# --- tree transfer and the local cache ---


def download_tree(uri: str, local_dir: str | os.PathLike[str]) -> None:
    """Copy every file below directory ``uri`` into ``local_dir`` (same relative paths)."""
    dest = Path(local_dir)
    if not is_gcs(uri):
        with _errors(uri, "copy"):
            shutil.copytree(_local_path(uri), dest, dirs_exist_ok=True)
        return
    rels = list(_below(uri))
    if not rels:
        raise StorageError(f"cannot download {uri}: no files below it")
    fs, path = _resolve(uri)
    # Into a hidden folder on the same filesystem, then each file renamed into place.
    tmp = dest / f".download.{uuid.uuid4().hex[:8]}"
    try:
        with _errors(uri, "download"):  # fsspec downloads a batch of files concurrently
            fs.get([f"{path}/{rel}" for rel in rels], [str(tmp / rel) for rel in rels])
            for rel in rels:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, dest / rel)
    finally:
        _remove_quietly(tmp)


def upload_tree(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy every file below ``local_dir`` to ``uri`` (same relative paths)."""
    src = Path(local_dir)
    if not src.is_dir():
        raise StorageError(f"cannot upload {src}: not a directory")
    if not is_gcs(uri):
        with _errors(uri, "copy"):
            shutil.copytree(src, _local_path(uri), dirs_exist_ok=True)
        return
    rels = list(_below(str(src)))
    fs, path = _resolve(uri)
    with _errors(uri, "upload"):  # fsspec uploads a batch of files concurrently
        fs.put([str(src / rel) for rel in rels], [f"{path}/{rel}" for rel in rels])


def _remove_quietly(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cache_dir(*parts: str) -> Path:
    """A path under the local cache, ``$GEMMA_SAE_CACHE`` (default ~/.cache/gemma-sae)."""
    root = Path(os.environ.get("GEMMA_SAE_CACHE") or "~/.cache/gemma-sae").expanduser()
    return root.joinpath(*parts)


def local_copy(uri: str) -> Path:
    """A local path holding ``uri``'s content: the path itself, or a cached GCS download.

    Needed for libraries that cannot read gs:// through fsspec (keras-hub goes through
    tf.io.gfile, which cannot reach an emulator). The cache lives at
    ``$GEMMA_SAE_CACHE/gcs/<bucket>/<path>`` (default ~/.cache/gemma-sae) and is
    refreshed only when the remote fingerprint_tree changes.
    """
    if not is_gcs(uri):
        return _local_path(uri)
    bucket, key = _split(uri)
    dest = cache_dir("gcs", bucket, key)
    stamp = dest.with_name(dest.name + ".stamp")  # beside, not inside, the copy
    tree, is_directory = _tree(uri)
    fp = _tree_hash(tree.items())
    if dest.exists() and stamp.is_file() and stamp.read_text() == fp:
        return dest
    fs, path = _resolve(uri)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with _errors(uri, "download"):  # fsspec downloads a batch of files concurrently
            remote = [f"{path}/{rel}" for rel in tree] if is_directory else [path]
            fs.get(remote, [str(tmp / rel) for rel in tree] if is_directory else [str(tmp)])
        with _errors(str(dest), "write"):
            stamp.unlink(missing_ok=True)  # never a valid stamp beside a half-swapped copy
            _remove_quietly(dest)
            os.replace(tmp, dest)
    finally:
        _remove_quietly(tmp)
    write_text(str(stamp), fp)
    return dest


# --- preflight and Orbax ---


def check_writable(uri: str) -> None:
    """Fail fast, before any work, if outputs cannot be written under ``uri``."""
    if not is_gcs(uri):
        path = _local_path(uri)
        with _errors(uri, "write"):
            path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise StorageError(f"cannot write {uri}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write {uri}: permission denied")
        return
    bucket = _split(uri)[0]
    # testIamPermissions needs no bucket-level role (unlike buckets.get, which
    # objectAdmin lacks), 404s for a missing bucket and reports what we may do.
    with _errors(uri, "write"):
        granted = _gcs(uri).call(
            "GET", "b/{}/iam/testPermissions", bucket, permissions=_CREATE, json_out=True
        )
    if _CREATE not in granted.get("permissions", []):
        raise StorageError(
            f"cannot write {uri}: permission denied "
            f"(no storage.objects.create on bucket '{bucket}')"
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
