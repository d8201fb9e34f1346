"""An image tag resolved to its digest, so that every worker of every attempt runs the same
immutable image: a tag such as `:latest` may move while a job runs or between a preemption and
its resubmission.

The digest is the registry's own answer to a manifest HEAD request (Docker Registry HTTP API
v2, which Artifact Registry and Container Registry serve): the `Docker-Content-Digest` of the
manifest (or multi-platform index) the tag names. Credentials are Application Default
Credentials; with GEMMA_SAE_REGISTRY_ENDPOINT set, requests go to that endpoint without
credentials (the tests' local fake registry).
"""

from __future__ import annotations

import os
import re

from sae.errors import InputError

ENDPOINT_ENV = "GEMMA_SAE_REGISTRY_ENDPOINT"
# What the tag may name: a multi-platform index or a single manifest, OCI or Docker.
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def split(image: str) -> tuple[str, str, str]:
    """(registry host, repository path, tag) of HOST/PATH[:TAG] (no tag: latest)."""
    host, _, rest = image.partition("/")
    path, _, tag = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "")
    return host, path, tag or "latest"


def pinned(image: str) -> bool:
    return "@sha256:" in image


def resolve(image: str, timeout: float = 30.0) -> str:
    """HOST/PATH@sha256:... for the image `image` names now (unchanged if already pinned);
    a one-line InputError when the registry has no such tag or refuses."""
    if pinned(image):
        return image
    import requests

    host, path, tag = split(image)
    endpoint = os.environ.get(ENDPOINT_ENV, "")
    headers = {"Accept": ACCEPT}
    if not endpoint:
        headers["Authorization"] = f"Bearer {_token()}"
    url = f"{endpoint or 'https://' + host}/v2/{path}/manifests/{tag}"
    try:
        response = requests.head(url, headers=headers, timeout=timeout, allow_redirects=True)
    except requests.RequestException as error:
        raise InputError(
            f"--image {image}: the registry {host} is unreachable ({type(error).__name__})"
        ) from None
    if response.status_code == 404:
        raise InputError(f"--image {image}: the registry has no such image or tag (push it)")
    if response.status_code in (401, 403):
        raise InputError(
            f"--image {image}: the registry refused (HTTP {response.status_code}): may this "
            "account read the repository?"
        )
    digest = response.headers.get("Docker-Content-Digest", "")
    if response.status_code != 200 or not _DIGEST.fullmatch(digest):
        raise InputError(
            f"--image {image}: the registry answered HTTP {response.status_code} without a "
            "manifest digest"
        )
    return f"{host}/{path}@{digest}"


def _token() -> str:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import Request

    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
        credentials.refresh(Request())
    except DefaultCredentialsError:
        raise InputError(
            "no Google Cloud credentials to read the image's digest: run `gcloud auth "
            "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None
    return str(credentials.token)
