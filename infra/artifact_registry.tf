# Docker repository for the images that cloudbuild.yaml builds and pushes
# (REGION-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE:COMMIT_SHA and :latest).
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:The images hold only the open-source gemma-sae code and public dependencies, encrypted at rest with Google-managed keys; a customer-managed key needs a Cloud KMS key ring that the project owner runs, which this module does not create.
  location      = var.region
  repository_id = var.repository_id
  format        = "DOCKER"
  description   = "gemma-sae container images (Dockerfile targets cpu and tpu), pushed by Cloud Build."

  depends_on = [google_project_service.enabled]
}
