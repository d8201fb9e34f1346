# gemma-sae on Cloud TPU v5e: the APIs, the data bucket (storage.tf), the image repository
# (artifact_registry.tf), a private network for the TPU VMs (network.tf), least-privilege
# service accounts (iam.tf), optional TPU VMs (tpu.tf, none by default), scheduled
# retraining (retrain.tf: a manual Cloud Build trigger fired by Cloud Scheduler) and the
# tokenize stage's Dataflow workers (dataflow.tf).

locals {
  apis = toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudscheduler.googleapis.com",
    "compute.googleapis.com",
    # Vulnerability scanning of every image pushed to Artifact Registry.
    "containerscanning.googleapis.com",
    # The tokenize stage's Beam pipeline on Dataflow (dataflow.tf).
    "dataflow.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "storage.googleapis.com",
    "tpu.googleapis.com",
  ])

  repository_url         = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${google_artifact_registry_repository.images.project}/${google_artifact_registry_repository.images.repository_id}"
  tpu_runtime_member     = "serviceAccount:${google_service_account.tpu_runtime.email}"
  orchestrator_member    = "serviceAccount:${google_service_account.orchestrator.email}"
  dataflow_worker_member = "serviceAccount:${google_service_account.dataflow_worker.email}"

  # Scheduled retraining is set up once a source repository is named (a manual trigger needs one).
  retrain_enabled = var.retrain_source != ""
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
