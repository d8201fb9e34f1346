"""Stage manifests: written last, they say an output is complete and what produced it.

A stage is up to date when its manifest exists and records the same config section and the
same input fingerprints; re-running it then does nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import time
from typing import Any

from sae.errors import InputError
from sae.io import storage

MANIFEST_NAME = "manifest.json"
_PACKAGES = (
    "gemma-sae",
    "jax",
    "flax",
    "optax",
    "keras",
    "keras-hub",
    "orbax-checkpoint",
    "apache-beam",
    "numpy",
)


def manifest_uri(output_uri: str) -> str:
    return storage.join(output_uri, MANIFEST_NAME)


def read(output_uri: str) -> dict[str, Any] | None:
    """The manifest of a finished stage output, or None when the stage has not completed."""
    uri = manifest_uri(output_uri)
    if not storage.exists(uri):
        return None
    return storage.read_json(uri)


def require(output_uri: str, stage: str, what: str = "") -> dict[str, Any]:
    """The manifest of a finished upstream `stage` output, or a one-line error saying which
    stage to run (`what` names the output in it; default "<stage> output")."""
    found = read(output_uri)
    if found is None or found.get("stage") != stage:
        name = what or f"{stage} output"
        raise InputError(f"no finished {name} at {output_uri}: run the {stage} stage first")
    return found


def fingerprint(output_uri: str) -> str:
    """A stable fingerprint of a finished output, for the manifests of stages that read it."""
    manifest = read(output_uri)
    if manifest is None:
        raise FileNotFoundError(manifest_uri(output_uri))
    return digest({k: manifest[k] for k in ("stage", "config", "inputs", "counts")})


def digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def is_up_to_date(
    output_uri: str, stage: str, config: dict[str, Any], inputs: dict[str, str]
) -> bool:
    manifest = read(output_uri)
    # Compared as stored: JSON has lists where a config may hold tuples.
    return (
        manifest is not None
        and manifest.get("stage") == stage
        and manifest.get("config") == json.loads(json.dumps(config))
        and manifest.get("inputs") == inputs
    )


def write(
    output_uri: str,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    counts: dict[str, Any],
    outputs: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the manifest; call only after every output file is in place."""
    manifest = {
        "stage": stage,
        "config": config,
        "inputs": inputs,
        "counts": counts,
        "outputs": sorted(outputs),
        "versions": package_versions(),
        "python": platform.python_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        manifest.update(extra)
    storage.write_json(manifest_uri(output_uri), manifest)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
