# TPU v5e VMs managed by Terraform, one per entry of var.tpu_vms (none by default, so applying
# the shared resources starts no TPU). Each runs one gemma-sae stage at boot on every worker
# (jobs/cloud/templates/tpu_startup.sh.tftpl, the script `gemma-sae submit` sends too) and then
# stays up until it is removed from var.tpu_vms; the scheduled retraining (retrain.tf)
# creates and deletes its own slices instead.
locals {
  tpu_vms = {
    for name, vm in var.tpu_vms : name => {
      accelerator_type = coalesce(vm.accelerator_type, var.tpu_accelerator_type)
      spot             = coalesce(vm.spot, var.tpu_spot)
      startup_script = templatefile("${path.module}/../jobs/cloud/templates/tpu_startup.sh.tftpl", {
        image         = "${local.repository_url}/${var.image_name}:${vm.image_tag}"
        stage         = vm.stage
        config        = vm.config
        config_base64 = ""
        overrides     = join(" ", vm.overrides)
        workdir       = vm.workdir
        # Nothing watches these VMs for exit codes or resubmits them: no status files, and a
        # stage that stops to be resumed (exit 75) is started again on the worker.
        status_uri = ""
        max_runs   = 5
      })
    }
  }
}

resource "google_tpu_v2_vm" "job" {
  provider = google-beta
  for_each = local.tpu_vms

  name             = each.key
  zone             = var.zone
  description      = "gemma-sae ${var.tpu_vms[each.key].stage} (managed by Terraform)."
  runtime_version  = var.tpu_runtime_version
  accelerator_type = each.value.accelerator_type

  scheduling_config {
    spot = each.value.spot
  }

  network_config {
    network             = google_compute_network.tpu.id
    subnetwork          = google_compute_subnetwork.tpu.id
    enable_external_ips = false
  }

  service_account {
    email = google_service_account.tpu_runtime.email
    scope = ["https://www.googleapis.com/auth/cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot = var.tpu_secure_boot
  }

  metadata = {
    startup-script = each.value.startup_script
    enable-oslogin = "TRUE"
  }

  depends_on = [
    google_project_iam_member.tpu_runtime,
    google_storage_bucket_iam_member.tpu_runtime_objects,
    google_artifact_registry_repository_iam_member.tpu_runtime_reader,
  ]
}
