output "bucket_name" {
  description = "Name of the data bucket."
  value       = google_storage_bucket.data.name
}

output "bucket_url" {
  description = "Base URI for gemma-sae workdirs, e.g. workdir=<bucket_url>/runs/NAME."
  value       = google_storage_bucket.data.url
}

output "repository_url" {
  description = "Docker repository path that cloudbuild.yaml pushes to (REGION-docker.pkg.dev/PROJECT/REPOSITORY)."
  value       = local.repository_url
}

output "tpu_image" {
  description = "The TPU image that Cloud Build pushes as :latest (and as :COMMIT_SHA)."
  value       = "${local.repository_url}/${var.image_name}:latest"
}

output "tpu_service_account_email" {
  description = "Service account for TPU VMs (gcloud ... --service-account)."
  value       = google_service_account.tpu_runtime.email
}

output "tpu_queued_resource_command" {
  description = "gcloud command that requests a TPU v5e slice running as the runtime service account (TPU VMs are not managed by Terraform yet)."
  value = join(" ", compact([
    "gcloud compute tpus queued-resources create ${var.tpu_name}",
    "--project=${var.project_id}",
    "--zone=${var.zone}",
    "--node-id=${var.tpu_name}",
    "--accelerator-type=${var.tpu_accelerator_type}",
    "--runtime-version=${var.tpu_runtime_version}",
    "--service-account=${google_service_account.tpu_runtime.email}",
    var.tpu_spot ? "--spot" : "",
  ]))
}
