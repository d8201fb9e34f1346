# One regional bucket, next to the TPUs, for every stage's inputs and outputs
# (workdir=gs://BUCKET/runs/NAME, checkpoints under .../checkpoints/); activation caches go
# under activations/.
resource "google_storage_bucket" "data" {
  #checkov:skip=CKV_GCP_62:Access is recorded by Cloud Audit Logs (Admin Activity always, Data Access where the project turns it on); legacy usage logs would need a second bucket and would log every one of the millions of shard reads a training run makes.
  name                        = var.bucket_name
  location                    = upper(var.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.bucket_force_destroy

  versioning {
    enabled = true
  }

  soft_delete_policy {
    retention_duration_seconds = var.soft_delete_retention_seconds
  }

  # Activation caches are large and can be re-extracted: delete every version of them
  # (live and noncurrent) once they are older than the retention.
  lifecycle_rule {
    condition {
      age            = var.activations_retention_days
      matches_prefix = var.activations_prefixes
      with_state     = "ANY"
    }
    action {
      type = "Delete"
    }
  }

  # Old checkpoints: Orbax keeps the newest checkpoints of a run and deletes the older ones,
  # which versioning would otherwise keep (each can be many GB) for the general noncurrent
  # retention below. Under the run prefixes superseded (noncurrent) versions go sooner.
  # (Lifecycle conditions match a name's prefix or suffix only, not a middle path part such
  # as */checkpoints/*, hence the run prefixes.)
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.checkpoint_noncurrent_retention_days
      matches_prefix             = var.checkpoint_prefixes
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  # Versioning keeps overwritten and deleted objects recoverable for a while, not forever.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  # Parts of uploads that a preempted job never finished.
  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_project_service.enabled]
}
