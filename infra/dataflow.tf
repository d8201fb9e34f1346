# The tokenize stage on Dataflow (tokenize.runner=dataflow): a worker service account with only
# what a Beam worker of this pipeline needs, its launchers, and the firewall rule that lets the
# workers of one job talk to each other on the private network. The worker image is the
# Dockerfile's `dataflow` target, which cloudbuild.yaml builds and pushes as
# <repository>/<image>-dataflow. The output `dataflow_tokenize_overrides` is the config to use.

resource "google_service_account" "dataflow_worker" {
  account_id   = var.dataflow_service_account_id
  display_name = "gemma-sae Dataflow worker"
  description  = "Runs the gemma-sae tokenize pipeline's Dataflow workers."

  depends_on = [google_project_service.enabled]
}

# Dataflow's own worker permissions (work items, shuffle, metrics); project-wide by design.
resource "google_project_iam_member" "dataflow_worker" {
  project = var.project_id
  role    = "roles/dataflow.worker"
  member  = local.dataflow_worker_member
}

# Corpus in, token shards out, the job's temp and staging files: objects of this bucket only,
# and not the ones only the retraining build writes (LATEST, its promotion request, its lock).
resource "google_storage_bucket_iam_member" "dataflow_worker_objects" {
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectUser"
  member = local.dataflow_worker_member

  condition {
    title       = "not-retraining-pointers"
    description = "Every object but the retraining LATEST, PROMOTE and lock."
    expression  = "resource.name != \"${local.retrain_latest_object}\" && resource.name != \"${local.retrain_promote_object}\" && resource.name != \"${local.retrain_lock_object}\""
  }
}

# The worker image (tokenize.dataflow.sdk_container_image).
resource "google_artifact_registry_repository_iam_member" "dataflow_worker_reader" {
  project    = google_artifact_registry_repository.images.project
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = local.dataflow_worker_member
}

# Whoever launches tokenize jobs (var.dataflow_launchers: users, groups or accounts): create,
# follow and cancel Dataflow jobs (a custom role: roles/dataflow.developer adds more), and act
# as the worker account only (the job runs as it). Staging files go to the data bucket, which
# a launcher reaches as it reaches its workdir.
resource "google_project_iam_custom_role" "dataflow_launcher" {
  role_id     = var.dataflow_launcher_role_id
  title       = "gemma-sae Dataflow launcher"
  description = "Create, follow and cancel Dataflow jobs."
  permissions = [
    "dataflow.jobs.cancel",
    "dataflow.jobs.create",
    "dataflow.jobs.get",
    "dataflow.jobs.list",
    "dataflow.messages.list",
    "dataflow.metrics.get",
  ]
  stage = "GA"
}

resource "google_project_iam_member" "dataflow_launcher" {
  for_each = toset(var.dataflow_launchers)

  project = var.project_id
  role    = google_project_iam_custom_role.dataflow_launcher.name
  member  = each.value
}

resource "google_service_account_iam_member" "dataflow_launcher_acts_as_worker" {
  for_each = toset(var.dataflow_launchers)

  service_account_id = google_service_account.dataflow_worker.name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value
}

# Dataflow tags its worker VMs "dataflow"; the workers of a job exchange data on TCP
# 12345-12346 (shuffle and streaming between workers) and need nothing else inbound.
resource "google_compute_firewall" "dataflow_workers" {
  name        = "${var.network_name}-dataflow"
  description = "Traffic between the Dataflow workers of a gemma-sae tokenize job."
  network     = google_compute_network.tpu.name
  direction   = "INGRESS"
  priority    = 1000

  source_tags = ["dataflow"]
  target_tags = ["dataflow"]

  allow {
    protocol = "tcp"
    ports    = ["12345-12346"]
  }

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}
