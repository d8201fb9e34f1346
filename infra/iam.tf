# The identity TPU VMs run as, with only what a gemma-sae job needs: read and write objects
# in the data bucket, pull images from the repository, write logs and metrics.
resource "google_service_account" "tpu_runtime" {
  account_id   = var.tpu_service_account_id
  display_name = "gemma-sae TPU runtime"
  description  = "Runs gemma-sae jobs on Cloud TPU v5e VMs."

  depends_on = [google_project_service.enabled]
}

# Objects only (get, list, create, update, delete), on this bucket only; no bucket admin.
resource "google_storage_bucket_iam_member" "tpu_runtime_objects" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectUser"
  member = local.tpu_runtime_member
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
