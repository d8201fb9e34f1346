variable "project_id" {
  description = "Google Cloud project that holds every resource."
  type        = string
}

variable "region" {
  description = "Region of the bucket, the Artifact Registry repository and the TPU VMs; pick one with Cloud TPU v5e (us-west4, us-east5, us-central1, europe-west4, ...)."
  type        = string
  default     = "us-west4"
}

variable "zone" {
  description = "Zone for TPU v5e VMs, inside var.region (v5e zones include us-west4-a, us-east5-b, us-central1-a, europe-west4-b)."
  type        = string
  default     = "us-west4-a"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", var.zone))
    error_message = "zone must be a zone name such as us-west4-a."
  }
}

variable "labels" {
  description = "Labels put on every resource that takes labels."
  type        = map(string)
  default = {
    app = "gemma-sae"
  }
}

variable "enable_apis" {
  description = "Enable the Google Cloud APIs this project needs (set false where they are managed elsewhere)."
  type        = bool
  default     = true
}

# ---- storage ----

variable "bucket_name" {
  description = "Globally unique name of the GCS bucket for corpora, token shards, activations, checkpoints and reports."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or digit."
  }
}

variable "bucket_force_destroy" {
  description = "Let `terraform destroy` delete the bucket while it still holds objects."
  type        = bool
  default     = false
}

variable "activations_prefixes" {
  description = "Object-name prefixes of bulky, re-creatable activation caches that are deleted after activations_retention_days."
  type        = list(string)
  default     = ["activations/"]
}

variable "activations_retention_days" {
  description = "Days after which objects under activations_prefixes are deleted."
  type        = number
  default     = 14

  validation {
    condition     = var.activations_retention_days >= 1 && floor(var.activations_retention_days) == var.activations_retention_days
    error_message = "activations_retention_days must be a whole number of days, at least 1."
  }
}

variable "noncurrent_version_retention_days" {
  description = "Days after which overwritten or deleted (noncurrent) object versions are removed."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_retention_days >= 1 && floor(var.noncurrent_version_retention_days) == var.noncurrent_version_retention_days
    error_message = "noncurrent_version_retention_days must be a whole number of days, at least 1."
  }
}

variable "soft_delete_retention_seconds" {
  description = "Soft-delete window of the bucket in seconds: 0 turns it off, otherwise 604800 (7 days) to 7776000 (90 days)."
  type        = number
  default     = 604800

  validation {
    condition     = var.soft_delete_retention_seconds == 0 || (var.soft_delete_retention_seconds >= 604800 && var.soft_delete_retention_seconds <= 7776000)
    error_message = "soft_delete_retention_seconds must be 0 or between 604800 and 7776000."
  }
}

# ---- container images ----

variable "repository_id" {
  description = "Artifact Registry Docker repository that Cloud Build pushes the gemma-sae images to (cloudbuild.yaml _REPOSITORY)."
  type        = string
  default     = "gemma-sae"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", var.repository_id))
    error_message = "repository_id must start with a lowercase letter and contain only lowercase letters, digits and '-' (at most 63 characters)."
  }
}

variable "image_name" {
  description = "Image name inside the repository (cloudbuild.yaml _IMAGE)."
  type        = string
  default     = "gemma-sae"
}

# ---- TPU runtime ----

variable "tpu_service_account_id" {
  description = "Account id (the part before '@') of the service account the TPU VMs run as."
  type        = string
  default     = "gemma-sae-tpu"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{4,28}[a-z0-9])$", var.tpu_service_account_id))
    error_message = "tpu_service_account_id must be 6-30 characters: lowercase letters, digits and '-', starting with a letter."
  }
}

variable "tpu_name" {
  description = "Name of the TPU v5e queued resource and node used in the suggested create command."
  type        = string
  default     = "gemma-sae"
}

variable "tpu_accelerator_type" {
  description = "TPU v5e slice shape: v5litepod-1/4/8 are single-host, v5litepod-16 and up are multi-host (8 chips per host)."
  type        = string
  default     = "v5litepod-8"

  validation {
    condition     = contains(["v5litepod-1", "v5litepod-4", "v5litepod-8", "v5litepod-16", "v5litepod-32", "v5litepod-64", "v5litepod-128", "v5litepod-256"], var.tpu_accelerator_type)
    error_message = "tpu_accelerator_type must be one of v5litepod-1/4/8/16/32/64/128/256."
  }
}

variable "tpu_runtime_version" {
  description = "TPU VM software version for v5e."
  type        = string
  default     = "v2-alpha-tpuv5-lite"
}

variable "tpu_spot" {
  description = "Request Spot (preemptible) TPU capacity; training resumes from its last checkpoint after preemption."
  type        = bool
  default     = true
}
