"""The container images, built and run for real with podman: no Docker engine, no registry.

scripts/ensure_podman.sh installs podman, runc and debootstrap from Debian's packages. No base
image can be pulled, so a Debian bookworm root filesystem with Python 3.11 is made with
debootstrap and imported as the Dockerfile's BASE_IMAGE. The cpu target then runs the tiny
local pipeline as its non-root user into a mounted directory; the tpu target (jax[tpu] and
libtpu from the package index) is built and its entry point prints its help, as running it
needs a TPU. A source change in a copy of the context rebuilds only the source layers. podman's
own storage keeps the base image and every layer between runs, so a second run only re-runs
the containers.

Needs root (debootstrap, rootful podman). Without podman these tests skip, and fail under
CI=true. Select or leave them out with `-m image` / `-m "not image"`.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from .conftest import SMALL, SMALL_SAES

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/gemma-sae-test"
LOCK = dict(
    line.split("==", 1) for line in (ROOT / "requirements-lock.txt").read_text().splitlines()
)

# The base image: Debian bookworm's Python 3.11 with venv and CA certificates, standing in for
# python:3.11-slim. The tag carries a hash of the recipe, so a changed recipe makes a new one.
SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_IMAGE = (
    "localhost/gemma-sae-test-base:"
    + hashlib.sha256(f"{SUITE} {BASE_PACKAGES}".encode()).hexdigest()[:12]
)
UID = 10001  # the Dockerfile's USER


class Podman:
    """Runs podman with the settings this kind of host needs: runc (crun fails on hybrid
    cgroups) and ulimits within the host's hard limits (podman's defaults are above them)."""

    def __init__(self) -> None:
        self.flags: list[str] = ["--runtime", "runc"]
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        if nofile != resource.RLIM_INFINITY:
            self.flags += ["--ulimit", f"nofile={nofile}:{nofile}"]
        nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
        self.flags += ["--ulimit", f"nproc={nproc}:{nproc}"]

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True, **kwargs
    ) -> subprocess.CompletedProcess:
        """`podman args...`, stdout and stderr together in `.stdout`."""
        result = subprocess.run(
            ["podman", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:2])} failed:\n{result.stdout[-6000:]}")
        return result

    def run(
        self, image: str, *command: str, options: tuple[str, ...] = (), timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """`command` in a throwaway container with no network: nothing it does may need one."""
        run = ["run", "--rm", "--pull=never", "--network=none", *self.flags, *options]
        return self(*run, image, *command, timeout=timeout)

    def image_id(self, tag: str) -> str | None:
        result = self("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture(scope="module")
def podman() -> Podman:
    missing = [t for t in ("podman", "runc") if shutil.which(t) is None]
    if _debootstrap() is None:
        missing.append("debootstrap")
    reason = ""
    if missing:
        reason = f"{', '.join(missing)} missing (run scripts/ensure_podman.sh as root)"
    elif os.geteuid() != 0:
        reason = "the image tests need root (debootstrap and rootful podman)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Podman()


def _debootstrap() -> str | None:
    return shutil.which("debootstrap", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _debian_mirror() -> str:
    """The Debian archive apt already uses here (a local mirror or proxy, if there is one)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    pattern = re.compile(r"^\s*(?:URIs:|deb(?:\s+\[[^\]]*\])?)\s+(\S+/debian)/?\s", re.MULTILINE)
    for source in sources:
        if source.is_file():
            match = pattern.search(source.read_text(errors="replace"))
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def base_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Debian's minimal root filesystem plus Python 3.11, imported as an image (once: kept in
    podman's storage under a tag naming the recipe)."""
    if podman.image_id(BASE_IMAGE):
        return BASE_IMAGE
    rootfs = tmp_path_factory.mktemp("base") / "rootfs"
    debootstrap = [_debootstrap(), "--variant=minbase", f"--include={BASE_PACKAGES}"]
    result = subprocess.run(
        [*debootstrap, SUITE, str(rootfs), _debian_mirror()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    # apt's package lists and downloaded .debs are of no use in the image.
    for cache in ("var/lib/apt/lists", "var/cache/apt"):
        shutil.rmtree(rootfs / cache)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    podman(
        "import",
        "--change", "ENV LANG=C.UTF-8",
        "--change", 'CMD ["python3"]',
        "-", BASE_IMAGE,
        stdin=tar.stdout, timeout=600,
    )  # fmt: skip
    assert tar.wait() == 0
    shutil.rmtree(rootfs)
    return BASE_IMAGE


@pytest.fixture(scope="module")
def pip_mounts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`podman build` volume flags giving pip in the RUN steps what the host's pip has: its
    configuration (files and PIP_* variables) flattened into one pip.conf, and the CA bundle,
    constraint files and local indexes that it names. Mounted while building, never copied
    into an image; with no pip configuration here, pip in the build uses PyPI as is."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values: dict[str, dict[str, str]] = {"global": {}}
    environment: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")  # global.cert, :env:.cert
        if section == ":env:":
            environment[name] = ast.literal_eval(value)
        elif section:
            values.setdefault(section, {})[name] = ast.literal_eval(value)
    values["global"].update(environment)  # as in pip: the environment wins over files
    config = configparser.ConfigParser(interpolation=None)
    config.read_dict(values)

    paths: set[Path] = set()
    for section in config.sections():
        for value in config[section].values():
            for token in value.split():
                if token.startswith("file://"):
                    path = Path(urlparse(token).path)
                    # A "simple" index links to its files as ../../files/<name>.
                    paths.add(path.parent if path.name == "simple" else path)
                elif token.startswith("/"):
                    paths.add(Path(token))
    pip_conf = tmp_path_factory.mktemp("pip") / "pip.conf"
    with pip_conf.open("w") as f:
        config.write(f)
    mounts = [f"--volume={pip_conf}:/etc/pip.conf:ro"]
    mounts += [f"--volume={p}:{p}:ro" for p in sorted(paths) if p.exists()]
    return mounts


@dataclass(frozen=True)
class Build:
    tag: str
    output: str  # podman build's log


def _build(
    podman: Podman, base: str, mounts: list[str], target: str, tag: str, context: Path = ROOT
) -> Build:
    """Build `target` as `tag`, reusing podman's layer cache. The image the tag named before
    is removed when this build replaced it (its layers shared with the new one stay)."""
    previous = podman.image_id(tag)
    output = podman(
        "build",
        "--pull=never",  # the base is local; nothing else may be fetched
        "--layers",
        "--network=host",  # pip reaches the package index
        f"--build-arg=BASE_IMAGE={base}",
        f"--target={target}",
        f"--tag={tag}",
        *podman.flags,
        *mounts,
        str(context),
        timeout=2400,
    ).stdout
    if previous and previous != podman.image_id(tag):
        podman("rmi", previous, check=False)
    return Build(tag, output)


@pytest.fixture(scope="module")
def cpu_image(podman: Podman, base_image: str, pip_mounts: list[str]) -> Build:
    return _build(podman, base_image, pip_mounts, "cpu", f"{IMAGE}:cpu")


@pytest.fixture(scope="module")
def tpu_image(podman: Podman, base_image: str, pip_mounts: list[str]) -> Build:
    return _build(podman, base_image, pip_mounts, "tpu", f"{IMAGE}:tpu")


SOURCES = ("sae", "jobs", "configs", "pyproject.toml", "requirements-lock.txt")
# What must never reach the context: tests, git, virtual environments, runs, caches, builds.
JUNK = (
    "tests/test_x.py", ".git/HEAD", ".venv/bin/python", ".venv-checkov/pyvenv.cfg",
    "runs/local/report/index.html", "sae/__pycache__/storage.cpython-311.pyc",
    "jobs/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/CACHEDIR.TAG", ".cache/gemma-sae/x", "build/lib/sae/__init__.py",
    "gemma_sae.egg-info/PKG-INFO", "docs/REPORT.md", "infra/main.tf",
)  # fmt: skip


def _context(podman: Podman, directory: Path, tmp_path: Path) -> set[str]:
    """The files of the build context podman sends from `directory`, exported as they are."""
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text("FROM scratch\nCOPY . /\n")
    exported = tmp_path / f"context-{uuid.uuid4().hex[:8]}"
    iid = tmp_path / "iid"
    podman(
        "build", "--pull=never", f"--iidfile={iid}", f"--file={containerfile}",
        f"--output=type=local,dest={exported}", str(directory),
    )  # fmt: skip
    podman("rmi", iid.read_text().strip(), check=False)
    return {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}


def _sources(directory: Path) -> set[str]:
    return {
        p.relative_to(directory).as_posix()
        for name in SOURCES
        for p in [directory / name, *(directory / name).rglob("*")]
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_build_context_holds_only_what_the_images_copy(podman: Podman, tmp_path: Path) -> None:
    """.dockerignore keeps tests, .git, virtual environments, runs and caches out of the
    context podman sends, and every source file in: in a context planted with all of them,
    and in the repository's."""
    planted = tmp_path / "planted"
    planted.mkdir()
    for name in (*SOURCES, ".dockerignore"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, planted / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, planted / name)
    for name in JUNK:
        (planted / name).parent.mkdir(parents=True, exist_ok=True)
        (planted / name).write_text("must not be sent\n")
    assert _context(podman, planted, tmp_path) == _sources(planted)

    sent = _context(podman, ROOT, tmp_path)
    assert {name.split("/")[0] for name in sent} == set(SOURCES)
    assert not [name for name in sent if "__pycache__" in name or name.endswith(".pyc")]
    assert _sources(ROOT) <= sent


def test_cpu_image_runs_the_local_pipeline_as_a_non_root_user(
    podman: Podman, cpu_image: Build, tmp_path: Path
) -> None:
    uid = podman.run(cpu_image.tag, "-u", options=("--entrypoint=id",)).stdout.split()[-1]
    assert uid == str(UID)

    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image's user must write here
    start = time.monotonic()
    mount = (f"--volume={out}:/app/runs/local",)  # the default workdir, runs/local
    result = podman.run(cpu_image.tag, "pipeline", *SMALL, options=mount, timeout=1800)
    print(f"pipeline in the cpu image: {time.monotonic() - start:.0f} s")
    report = out / "report"
    assert (report / "manifest.json").is_file(), result.stdout[-4000:]
    manifest = json.loads((report / "manifest.json").read_text())
    assert "jax" in manifest["versions"]
    index = (report / "index.html").read_text()
    for name in SMALL_SAES:
        assert f'href="{name}/index.html"' in index
        metrics = json.loads((report / name / "metrics.json").read_text())
        assert math.isfinite(metrics["fraction_variance_explained"])
        assert metrics["fraction_variance_explained"] > 0.5
        pages = sorted((report / name / "features").glob("*.html"))
        assert pages and 'class="tok hl"' in pages[0].read_text()
    # Written by the image's user, not root.
    assert {p.stat().st_uid for p in report.rglob("*")} == {UID}


def test_tpu_image_has_the_locked_jax_and_libtpu(podman: Podman, tpu_image: Build) -> None:
    versions = podman.run(
        tpu_image.tag,
        "-c",
        "from importlib.metadata import version as v; import os;"
        "print(v('jax'), v('jaxlib'), v('libtpu'), os.getuid())",
        options=("--entrypoint=python",),
    ).stdout.split()
    dockerfile = (ROOT / "Dockerfile").read_text()
    libtpu = re.search(r'"libtpu==([\d.]+)"', dockerfile).group(1)
    assert versions[-4:] == [LOCK["jax"], LOCK["jaxlib"], libtpu, str(UID)]


@pytest.mark.parametrize("target", ["cpu", "tpu"])
def test_entry_point_prints_its_help(podman: Podman, target: str, request) -> None:
    image = request.getfixturevalue(f"{target}_image").tag
    for args in (["--help"], []):  # no arguments: the image's CMD is --help
        result = podman.run(image, *args)
        assert "usage: gemma-sae" in result.stdout, result.stdout[-2000:]
        assert "pipeline" in result.stdout


def test_a_source_change_rebuilds_only_the_source_layers(
    podman: Podman, base_image: str, pip_mounts: list[str], cpu_image: Build, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("sae", "jobs", "configs"):
        shutil.copytree(ROOT / name, context / name, ignore=skip)
    for name in ("pyproject.toml", "requirements-lock.txt", "Dockerfile", ".dockerignore"):
        shutil.copy2(ROOT / name, context / name)
    # A new line in a module: new content every run, so the source layers can never be cached.
    with (context / "sae" / "__init__.py").open("a") as f:
        f.write(f"# layer cache check {uuid.uuid4()}\n")

    tag = f"{IMAGE}:cache-check"
    start = time.monotonic()
    rebuild = _build(podman, base_image, pip_mounts, "cpu", tag, context)
    seconds = time.monotonic() - start
    try:
        before, after = _steps(cpu_image.output), _steps(rebuild.output)
        assert [step for step, _, _ in before] == [step for step, _, _ in after]
        source = next(i for i, (step, _, _) in enumerate(after) if step.startswith("COPY sae"))
        deps = next(i for i, (step, _, _) in enumerate(after) if "-r requirements-lock" in step)
        assert deps < source
        # Every step before the source is taken from the cache, down to the same image ids
        # as the build from the repository; from the source on, every step runs again.
        for i, (step, cached, layer) in enumerate(after):
            if step.startswith("FROM"):
                continue
            assert cached == (i < source), f"{step}: {'' if cached else 'not '}cached"
            assert (layer == before[i][2]) == (i < source), step
        print(f"rebuild after a source change: {seconds:.0f} s")
    finally:
        podman("rmi", tag, check=False)


def _steps(output: str) -> list[tuple[str, bool, str]]:
    """(instruction, whether podman took it from its cache, the id of the image it made) for
    each step of a build's output, every stage's in order."""
    steps: list[tuple[str, bool, str]] = []
    for line in output.splitlines():
        match = re.match(r"(?:\[\d+/\d+\] )?STEP \d+/\d+: (.*)", line)
        if match:
            steps.append((match.group(1), False, ""))
        elif steps and line.startswith("--> Using cache "):
            steps[-1] = (steps[-1][0], True, steps[-1][2])
        elif steps and re.fullmatch(r"--> [0-9a-f]{11,64}", line):
            steps[-1] = (steps[-1][0], steps[-1][1], line[4:])
    return steps
