# Shared cloud resources for gemma-sae: APIs, the data bucket, the image repository and the
# least-privilege service account that TPU v5e VMs run as. TPU VMs and scheduled retraining
# are not managed here yet.

locals {
  apis = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "compute.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "storage.googleapis.com",
    "tpu.googleapis.com",
  ])

  repository_url     = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${google_artifact_registry_repository.images.project}/${google_artifact_registry_repository.images.repository_id}"
  tpu_runtime_member = "serviceAccount:${google_service_account.tpu_runtime.email}"
}

resource "google_project_service" "enabled" {
  for_each = var.enable_apis ? local.apis : toset([])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

check "zone_in_region" {
  assert {
    condition     = startswith(var.zone, "${var.region}-")
    error_message = "zone ${var.zone} is not in region ${var.region}; TPU VMs should sit next to the bucket and the images."
  }
}
