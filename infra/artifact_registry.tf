# Docker repository for the images that cloudbuild.yaml builds and pushes
# (REGION-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE:COMMIT_SHA and :latest).
resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = var.repository_id
  format        = "DOCKER"
  description   = "gemma-sae container images (Dockerfile targets cpu and tpu), pushed by Cloud Build."

  depends_on = [google_project_service.enabled]
}
