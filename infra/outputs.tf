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
  description = "Service account that TPU VMs run as (gcloud ... --service-account)."
  value       = google_service_account.tpu_runtime.email
}

output "orchestrator_service_account_email" {
  description = "Service account that the scheduled retraining runs as: it may create and delete TPU VMs running as the TPU runtime account and read the retraining status objects."
  value       = google_service_account.orchestrator.email
}

output "tpu_network" {
  description = "Network and subnetwork names for TPU VMs (gcloud ... --network --subnetwork --internal-ips)."
  value = {
    network    = google_compute_network.tpu.name
    subnetwork = google_compute_subnetwork.tpu.name
  }
}

output "startup_script_template" {
  description = "Path of the TPU VM startup script template, shared with gemma-sae submit (its header lists the variables)."
  value       = "${path.module}/../jobs/cloud/templates/tpu_startup.sh.tftpl"
}

output "tpu_vms" {
  description = "TPU VMs managed by Terraform (var.tpu_vms): name => zone, accelerator type, spot, stage and workdir."
  value = {
    for name, vm in google_tpu_v2_vm.job : name => {
      zone             = vm.zone
      accelerator_type = vm.accelerator_type
      spot             = local.tpu_vms[name].spot
      stage            = var.tpu_vms[name].stage
      workdir          = var.tpu_vms[name].workdir
    }
  }
}

output "tpu_queued_resource_command" {
  description = "gcloud command that requests a TPU v5e slice on the private network, running as the runtime service account; add --metadata-from-file=startup-script=FILE with a rendered startup_script_template to run a stage on every worker."
  value = join(" ", compact([
    "gcloud compute tpus queued-resources create ${var.tpu_name}",
    "--project=${var.project_id}",
    "--zone=${var.zone}",
    "--node-id=${var.tpu_name}",
    "--accelerator-type=${var.tpu_accelerator_type}",
    "--runtime-version=${var.tpu_runtime_version}",
    "--service-account=${google_service_account.tpu_runtime.email}",
    "--network=${google_compute_network.tpu.name}",
    "--subnetwork=${google_compute_subnetwork.tpu.name}",
    "--internal-ips",
    var.tpu_spot ? "--spot" : "",
  ]))
}

output "retrain_trigger" {
  description = "The retraining Cloud Build trigger (null unless retrain_source is set); run it by hand with: gcloud builds triggers run NAME --region=LOCATION."
  value = local.retrain_enabled ? {
    name     = google_cloudbuild_trigger.retrain[0].name
    location = google_cloudbuild_trigger.retrain[0].location
    id       = google_cloudbuild_trigger.retrain[0].trigger_id
  } : null
}

output "retrain_schedule" {
  description = "When Cloud Scheduler runs the retraining trigger (null unless retrain_source is set)."
  value       = local.retrain_enabled ? "${google_cloud_scheduler_job.retrain[0].schedule} (${google_cloud_scheduler_job.retrain[0].time_zone})" : null
}

output "dataflow_service_account_email" {
  description = "Service account that the tokenize stage's Dataflow workers run as."
  value       = google_service_account.dataflow_worker.email
}

output "dataflow_tokenize_overrides" {
  description = "Config overrides that run the tokenize stage on Dataflow with this infrastructure: the worker account, the private subnetwork (no public IPs), the worker image cloudbuild.yaml pushes and temp space in the bucket."
  value = join(" ", [
    "tokenize.runner=dataflow",
    "tokenize.dataflow.project=${var.project_id}",
    "tokenize.dataflow.region=${var.region}",
    "tokenize.dataflow.temp_location=${google_storage_bucket.data.url}/dataflow/tmp",
    "tokenize.dataflow.service_account_email=${google_service_account.dataflow_worker.email}",
    "tokenize.dataflow.subnetwork=regions/${var.region}/subnetworks/${google_compute_subnetwork.tpu.name}",
    "tokenize.dataflow.no_use_public_ips=true",
    "tokenize.dataflow.sdk_container_image=${local.repository_url}/${var.image_name}-dataflow:latest",
  ])
}
