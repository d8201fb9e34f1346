# Scheduled retraining, set up when var.retrain_source names a source repository:
#   Cloud Scheduler (retrain_schedule) --POST triggers/ID:run--> a manual Cloud Build trigger
#   whose one build step, running as the orchestrator account, requests a TPU v5e slice that
#   runs `gemma-sae retrain workdir=<retrain_workdir> ...` (retrain_stage) on every worker,
#   waits for the workers' exit codes and deletes the slice (templates/retrain.sh.tftpl).
#   Each run is RETRAIN_WORKDIR/runs/<UTC timestamp>/, warm-started from the run that
#   RETRAIN_WORKDIR/LATEST names; LATEST moves only when a run succeeds, a week without new
#   corpus files or config changes makes no run, and stages whose manifests match are skipped
#   (jobs/cloud/retrain.py).
locals {
  retrain_workdir       = var.retrain_workdir != "" ? var.retrain_workdir : "${google_storage_bucket.data.url}/retrain"
  retrain_status_prefix = "${google_storage_bucket.data.url}/${trimsuffix(var.retrain_status_prefix, "/")}"
  retrain_deadline_s    = var.retrain_timeout_hours * 3600
  retrain_by_repository = startswith(var.retrain_source, "projects/")
  retrain_promotes      = var.retrain_stage == "retrain"
  # IAM condition names of the objects only the orchestrator writes (iam.tf).
  retrain_object_prefix  = "projects/_/buckets/${google_storage_bucket.data.name}/objects/"
  retrain_latest_object  = "${local.retrain_object_prefix}${trimprefix(local.retrain_workdir, "${google_storage_bucket.data.url}/")}/LATEST"
  retrain_promote_object = "${local.retrain_object_prefix}${trimprefix(local.retrain_workdir, "${google_storage_bucket.data.url}/")}/PROMOTE"
  retrain_lock_object    = "${local.retrain_object_prefix}${var.retrain_status_prefix}LOCK"

  retrain_startup_script = templatefile("${path.module}/../jobs/cloud/templates/tpu_startup.sh.tftpl", {
    image         = "${local.repository_url}/${var.image_name}:${var.retrain_image_tag}"
    stage         = var.retrain_stage
    config        = var.retrain_config
    config_base64 = ""
    # The runtime account may not write LATEST: the retrain stage asks the build to move it.
    overrides = join(" ", concat(var.retrain_overrides, local.retrain_promotes ? ["--promotion-request"] : []))
    workdir   = local.retrain_workdir
    # Rendered once: each attempt's status prefix comes from the gemma-sae-status metadata.
    status_uri = ""
    # A stage that exits 75 ends the attempt: retrain.sh requests a new slice, and the run
    # resumes there (gemma-sae retrain picks up the run it started).
    max_runs = 1
  })

  retrain_script = templatefile("${path.module}/templates/retrain.sh.tftpl", {
    project          = var.project_id
    zone             = var.zone
    name             = "${var.tpu_name}-retrain"
    accelerator_type = var.tpu_accelerator_type
    runtime_version  = var.tpu_runtime_version
    service_account  = google_service_account.tpu_runtime.email
    network          = google_compute_network.tpu.name
    subnetwork       = google_compute_subnetwork.tpu.name
    spot             = var.tpu_spot
    status_prefix    = local.retrain_status_prefix
    max_attempts     = var.retrain_max_attempts
    deadline_seconds = local.retrain_deadline_s
    promote          = local.retrain_promotes ? "${local.retrain_workdir}/PROMOTE" : ""
    latest           = "${local.retrain_workdir}/LATEST"
  })

  # Both scripts travel base64-encoded, so Cloud Build substitutions ($VAR) leave them alone.
  retrain_step_command = join(" && ", [
    "echo ${base64encode(local.retrain_startup_script)} | base64 -d >/workspace/gemma-sae-startup.sh",
    "echo ${base64encode(local.retrain_script)} | base64 -d >/workspace/gemma-sae-retrain.sh",
    "exec bash /workspace/gemma-sae-retrain.sh /workspace/gemma-sae-startup.sh",
  ])
}

resource "google_cloudbuild_trigger" "retrain" {
  count = local.retrain_enabled ? 1 : 0

  name            = var.retrain_trigger_name
  location        = var.retrain_trigger_location
  description     = "gemma-sae scheduled retraining: ${var.retrain_stage} on a ${var.tpu_accelerator_type} slice (run by Cloud Scheduler or by hand)."
  service_account = google_service_account.orchestrator.id
  tags            = ["gemma-sae", "retrain"]

  # No event starts this trigger (a manual trigger): only triggers.run does.
  source_to_build {
    uri        = local.retrain_by_repository ? null : var.retrain_source
    repository = local.retrain_by_repository ? var.retrain_source : null
    ref        = var.retrain_source_ref
    repo_type  = var.retrain_source_repo_type
  }

  build {
    timeout = "${local.retrain_deadline_s + 1800}s"
    tags    = ["gemma-sae", "retrain"]

    step {
      id         = "launch-and-wait"
      name       = var.retrain_builder_image
      entrypoint = "bash"
      args       = ["-c", local.retrain_step_command]
      env        = ["RUN_ID=$BUILD_ID"]
    }

    options {
      # Builds that run as a user-managed service account must log to Cloud Logging only.
      logging = "CLOUD_LOGGING_ONLY"
    }
  }

  depends_on = [
    google_project_iam_member.orchestrator,
    google_service_account_iam_member.orchestrator_acts_as_tpu_runtime,
    google_storage_bucket_iam_member.orchestrator_status_reader,
    google_storage_bucket_iam_member.orchestrator_retrain_lock,
    google_storage_bucket_iam_member.orchestrator_retrain_pointers,
  ]
}

# POST https://cloudbuild.googleapis.com/v1/projects/P/locations/L/triggers/ID:run with an
# OAuth token of the invoker account. Not retried (Cloud Scheduler's default); a second build
# started while one runs finds its lock and exits without touching it (retrain.sh.tftpl).
resource "google_cloud_scheduler_job" "retrain" {
  count = local.retrain_enabled ? 1 : 0

  name             = var.retrain_trigger_name
  region           = var.region
  description      = "Runs the ${var.retrain_trigger_name} Cloud Build trigger on a schedule."
  schedule         = var.retrain_schedule
  time_zone        = var.retrain_time_zone
  paused           = var.retrain_paused
  attempt_deadline = "60s"

  http_target {
    http_method = "POST"
    uri         = "https://cloudbuild.googleapis.com/v1/projects/${var.project_id}/locations/${google_cloudbuild_trigger.retrain[0].location}/triggers/${google_cloudbuild_trigger.retrain[0].trigger_id}:run"
    headers = {
      "Content-Type" = "application/json"
    }
    body = base64encode(jsonencode({
      projectId = var.project_id
      triggerId = google_cloudbuild_trigger.retrain[0].trigger_id
      source = {
        (startswith(var.retrain_source_ref, "refs/tags/") ? "tagName" : "branchName") = trimprefix(trimprefix(var.retrain_source_ref, "refs/heads/"), "refs/tags/")
      }
    }))

    oauth_token {
      service_account_email = google_service_account.retrain_invoker[0].email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.retrain_invoker,
    google_service_account_iam_member.retrain_invoker_acts_as_orchestrator,
  ]
}
