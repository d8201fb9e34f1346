# Docker repository for the images that cloudbuild.yaml builds and pushes
# (REGION-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE:COMMIT_SHA and :latest).
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:The images hold only the open-source gemma-sae code and public dependencies, encrypted at rest with Google-managed keys; a customer-managed key needs a Cloud KMS key ring that the project owner runs, which this module does not create.
  location      = var.region
  repository_id = var.repository_id
  format        = "DOCKER"
  description   = "gemma-sae container images (Dockerfile targets cpu and tpu), pushed by Cloud Build."

  # Every build pushes multi-GB images. Keep the newest image_keep_versions versions of each
  # image (retraining and submissions run recent ones; KEEP wins over DELETE) and delete the
  # rest once older than image_retention_days, and untagged leftovers after a day.
  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = var.image_keep_versions
    }
  }
  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "${var.image_retention_days * 86400}s"
    }
  }
  cleanup_policies {
    id     = "delete-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "86400s"
    }
  }

  depends_on = [google_project_service.enabled]
}
