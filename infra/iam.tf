# Service accounts, each with only what its job needs:
#   tpu_runtime      the identity TPU VMs run as: objects in the data bucket, images from the
#                    repository, logs and metrics.
#   orchestrator     creates and deletes TPU VMs that run as tpu_runtime (the scheduled
#                    retraining build runs as it; so can `gemma-sae` submissions).
#   retrain_invoker  what Cloud Scheduler runs the retraining trigger as (only with
#                    var.retrain_source set).

# ---- TPU runtime ----

resource "google_service_account" "tpu_runtime" {
  account_id   = var.tpu_service_account_id
  display_name = "gemma-sae TPU runtime"
  description  = "Runs gemma-sae jobs on Cloud TPU v5e VMs."

  depends_on = [google_project_service.enabled]
}

# Objects only (get, list, create, update, delete), on this bucket only; no bucket admin; and
# not the two objects the retraining build trusts: LATEST (which the build moves) and the
# build's lock (templates/retrain.sh.tftpl).
resource "google_storage_bucket_iam_member" "tpu_runtime_objects" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectUser"
  member = local.tpu_runtime_member

  condition {
    title       = "not-latest-or-lock"
    description = "Every object but the retraining LATEST pointer and lock."
    expression  = "resource.name != \"${local.retrain_latest_object}\" && resource.name != \"${local.retrain_lock_object}\""
  }
}

# LATEST is read (the run warm-starts from it), never written, by the TPU workers.
resource "google_storage_bucket_iam_member" "tpu_runtime_reads_latest" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectViewer"
  member = local.tpu_runtime_member

  condition {
    title       = "retrain-latest-only"
    description = "Only the retraining LATEST pointer."
    expression  = "resource.name == \"${local.retrain_latest_object}\""
  }
}

resource "google_artifact_registry_repository_iam_member" "tpu_runtime_reader" {
  project    = google_artifact_registry_repository.images.project
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = local.tpu_runtime_member
}

resource "google_project_iam_member" "tpu_runtime" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
  ])

  project = var.project_id
  role    = each.value
  member  = local.tpu_runtime_member
}

# ---- orchestrator ----

resource "google_service_account" "orchestrator" {
  account_id   = var.orchestrator_service_account_id
  display_name = "gemma-sae TPU orchestrator"
  description  = "Creates and deletes gemma-sae TPU VMs that run as the TPU runtime account."

  depends_on = [google_project_service.enabled]
}

# Cloud TPU has no per-node IAM, so the TPU permissions are granted on the project, but only
# these (create, inspect and delete nodes and queued resources; follow their operations),
# rather than roles/tpu.admin.
resource "google_project_iam_custom_role" "tpu_orchestrator" {
  role_id     = var.orchestrator_role_id
  title       = "gemma-sae TPU orchestrator"
  description = "Create, inspect and delete Cloud TPU VMs and queued resources."
  permissions = var.orchestrator_tpu_permissions
  stage       = "GA"
}

resource "google_project_iam_member" "orchestrator" {
  for_each = {
    tpu  = google_project_iam_custom_role.tpu_orchestrator.name
    logs = "roles/logging.logWriter" # build logs of the retraining trigger
  }

  project = var.project_id
  role    = each.value
  member  = local.orchestrator_member
}

# Creating a TPU VM that runs as tpu_runtime needs iam.serviceAccounts.actAs on that account
# (and on no other).
resource "google_service_account_iam_member" "orchestrator_acts_as_tpu_runtime" {
  service_account_id = google_service_account.tpu_runtime.name
  role               = "roles/iam.serviceAccountUser"
  member             = local.orchestrator_member
}

# The retraining build resolves the image tag the slice runs to its digest (retrain.sh.tftpl).
resource "google_artifact_registry_repository_iam_member" "orchestrator_reader" {
  project    = google_artifact_registry_repository.images.project
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = local.orchestrator_member
}

# The retraining build reads the exit codes that the workers write; nothing else in the bucket.
resource "google_storage_bucket_iam_member" "orchestrator_status_reader" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectViewer"
  member = local.orchestrator_member

  condition {
    title       = "retrain-status-only"
    description = "Only the exit codes under the retraining status prefix."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.data.name}/objects/${var.retrain_status_prefix}\")"
  }
}

# The retraining build's lock (templates/retrain.sh.tftpl): created only where none exists,
# deleted only at the generation it wrote; this one object, nothing else.
resource "google_storage_bucket_iam_member" "orchestrator_retrain_lock" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectUser"
  member = local.orchestrator_member

  condition {
    title       = "retrain-lock-only"
    description = "Only the retraining lock object."
    expression  = "resource.name == \"${local.retrain_lock_object}\""
  }
}

# The build moves LATEST when a run asks for it (PROMOTE) and has succeeded, and removes the
# request: these two objects, nothing else.
resource "google_storage_bucket_iam_member" "orchestrator_retrain_pointers" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectUser"
  member = local.orchestrator_member

  condition {
    title       = "retrain-latest-and-promote-only"
    description = "Only the retraining LATEST pointer and its promotion request."
    expression  = "resource.name == \"${local.retrain_latest_object}\" || resource.name == \"${local.retrain_promote_object}\""
  }
}

# ---- scheduled retraining ----

resource "google_service_account" "retrain_invoker" {
  count = local.retrain_enabled ? 1 : 0

  account_id   = var.retrain_invoker_service_account_id
  display_name = "gemma-sae retraining scheduler"
  description  = "Cloud Scheduler runs the gemma-sae retraining trigger as this account."

  depends_on = [google_project_service.enabled]
}

# Running a trigger needs cloudbuild.builds.create, and Cloud Build has no per-trigger IAM, so
# the invoker gets a custom role with just that (roles/cloudbuild.builds.editor would add
# cancelling and editing every build in the project).
resource "google_project_iam_custom_role" "retrain_invoker" {
  count = local.retrain_enabled ? 1 : 0

  role_id     = var.retrain_invoker_role_id
  title       = "gemma-sae retraining invoker"
  description = "Run Cloud Build triggers (cloudbuild.builds.create)."
  permissions = ["cloudbuild.builds.create"]
  stage       = "GA"
}

resource "google_project_iam_member" "retrain_invoker" {
  count = local.retrain_enabled ? 1 : 0

  project = var.project_id
  role    = google_project_iam_custom_role.retrain_invoker[0].name
  member  = "serviceAccount:${google_service_account.retrain_invoker[0].email}"
}

# The trigger's builds run as the orchestrator, so whoever runs it must be able to act as it.
resource "google_service_account_iam_member" "retrain_invoker_acts_as_orchestrator" {
  count = local.retrain_enabled ? 1 : 0

  service_account_id = google_service_account.orchestrator.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.retrain_invoker[0].email}"
}
