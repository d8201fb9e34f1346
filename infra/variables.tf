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

variable "checkpoint_prefixes" {
  description = "Object-name prefixes of run workdirs, whose superseded (noncurrent) versions, mostly old Orbax checkpoints, are removed after checkpoint_noncurrent_retention_days."
  type        = list(string)
  default     = ["runs/"]
}

variable "checkpoint_noncurrent_retention_days" {
  description = "Days after which noncurrent object versions under checkpoint_prefixes (old checkpoints that training deleted or replaced) are removed."
  type        = number
  default     = 3

  validation {
    condition     = var.checkpoint_noncurrent_retention_days >= 1 && floor(var.checkpoint_noncurrent_retention_days) == var.checkpoint_noncurrent_retention_days
    error_message = "checkpoint_noncurrent_retention_days must be a whole number of days, at least 1."
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

variable "image_keep_versions" {
  description = "Artifact Registry cleanup: the newest versions of each image that are always kept."
  type        = number
  default     = 10

  validation {
    condition     = var.image_keep_versions >= 1
    error_message = "image_keep_versions must be at least 1."
  }
}

variable "image_retention_days" {
  description = "Artifact Registry cleanup: older image versions beyond image_keep_versions are deleted after this many days."
  type        = number
  default     = 30

  validation {
    condition     = var.image_retention_days >= 1
    error_message = "image_retention_days must be at least 1."
  }
}

variable "image_name" {
  description = "Image name inside the repository (cloudbuild.yaml _IMAGE)."
  type        = string
  default     = "gemma-sae"
}

# ---- network ----

variable "network_name" {
  description = "Name of the VPC network and subnetwork that TPU VMs use (internal IPs only, Private Google Access on)."
  type        = string
  default     = "gemma-sae"
}

variable "subnet_cidr" {
  description = "IPv4 range of the TPU subnetwork in var.region; each TPU VM worker takes one address."
  type        = string
  default     = "10.64.0.0/20"

  validation {
    condition     = can(cidrhost(var.subnet_cidr, 0))
    error_message = "subnet_cidr must be an IPv4 CIDR range such as 10.64.0.0/20."
  }
}

variable "allow_iap_ssh" {
  description = "Allow SSH to TPU VM workers from Identity-Aware Proxy (gcloud compute tpus tpu-vm ssh --tunnel-through-iap); no other SSH source is allowed."
  type        = bool
  default     = true
}

# ---- TPU VMs ----

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
  description = "Name of the TPU queued resource and node in the suggested gcloud command; the scheduled retraining slice is named TPU_NAME-retrain."
  type        = string
  default     = "gemma-sae"

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$", var.tpu_name))
    error_message = "tpu_name must start with a lowercase letter and contain only lowercase letters, digits and '-' (at most 42 characters)."
  }
}

variable "tpu_accelerator_type" {
  description = "TPU v5e slice shape for retraining, the suggested command and tpu_vms entries that name none: v5litepod-1/4/8 are single-host, v5litepod-16 and up are multi-host (8 chips per host)."
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
  description = "Use Spot TPU capacity (cheaper, can be preempted; training resumes from its last checkpoint) rather than on-demand, for retraining and tpu_vms entries that do not say."
  type        = bool
  default     = true
}

variable "tpu_secure_boot" {
  description = "Turn on Shielded VM Secure Boot on Terraform-managed TPU VMs (where the runtime version supports it)."
  type        = bool
  default     = false
}

variable "tpu_vms" {
  description = <<-EOT
    TPU v5e VMs for Terraform to create, by name (default none). Each runs one gemma-sae stage
    at boot on every worker, with the image REPOSITORY/IMAGE_NAME:image_tag:
    `gemma-sae <stage> workdir=<workdir> <overrides...> [--config <config>]`.
    accelerator_type and spot default to tpu_accelerator_type and tpu_spot. Example:
    { sae-l12 = { stage = "train", config = "configs/gemma2-2b-v5e-8.yaml",
                  workdir = "gs://BUCKET/runs/gemma2-2b-l12", overrides = ["train.steps=20000"] } }
  EOT
  type = map(object({
    stage            = string
    workdir          = string
    config           = optional(string, "")
    overrides        = optional(list(string), [])
    accelerator_type = optional(string)
    spot             = optional(bool)
    image_tag        = optional(string, "latest")
  }))
  default = {}

  validation {
    condition     = alltrue([for name, vm in var.tpu_vms : can(regex("^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$", name))])
    error_message = "tpu_vms keys are TPU names: lowercase letters, digits and '-', starting with a letter."
  }
  validation {
    condition     = alltrue([for vm in var.tpu_vms : contains(["demo", "tokenize", "extract", "train", "report", "pipeline"], vm.stage)])
    error_message = "tpu_vms[*].stage must be one of demo, tokenize, extract, train, report, pipeline."
  }
  validation {
    condition     = alltrue([for vm in var.tpu_vms : vm.accelerator_type == null || can(regex("^v5litepod-(1|4|8|16|32|64|128|256)$", coalesce(vm.accelerator_type, "-")))])
    error_message = "tpu_vms[*].accelerator_type must be one of v5litepod-1/4/8/16/32/64/128/256."
  }
  validation {
    condition     = alltrue([for vm in var.tpu_vms : alltrue([for word in concat([vm.workdir, vm.config, vm.image_tag], vm.overrides) : !can(regex("['\\s]", word))])])
    error_message = "tpu_vms[*] workdir, config, image_tag and each override must not contain quotes or whitespace."
  }
}

# ---- orchestrator ----

variable "orchestrator_service_account_id" {
  description = "Account id of the service account that creates and deletes TPU VMs running as the TPU runtime account (the retraining build runs as it)."
  type        = string
  default     = "gemma-sae-orchestrator"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{4,28}[a-z0-9])$", var.orchestrator_service_account_id))
    error_message = "orchestrator_service_account_id must be 6-30 characters: lowercase letters, digits and '-', starting with a letter."
  }
}

variable "orchestrator_role_id" {
  description = "Id of the project custom role with the orchestrator's TPU permissions."
  type        = string
  default     = "gemmaSaeTpuOrchestrator"

  validation {
    condition     = can(regex("^[a-zA-Z0-9_.]{3,64}$", var.orchestrator_role_id))
    error_message = "orchestrator_role_id must be 3-64 letters, digits, '_' or '.'."
  }
}

variable "orchestrator_tpu_permissions" {
  description = "The TPU permissions of the orchestrator's custom role: create, inspect and delete TPU VMs and queued resources (which Cloud TPU authorizes with the tpu.nodes permissions) and follow their operations."
  type        = list(string)
  default = [
    "tpu.nodes.create",
    "tpu.nodes.delete",
    "tpu.nodes.get",
    "tpu.nodes.list",
    "tpu.operations.get",
    "tpu.operations.list",
  ]

  validation {
    condition     = length(var.orchestrator_tpu_permissions) > 0 && alltrue([for p in var.orchestrator_tpu_permissions : startswith(p, "tpu.")])
    error_message = "orchestrator_tpu_permissions must be a non-empty list of tpu.* permissions."
  }
}

# ---- scheduled retraining ----

variable "retrain_source" {
  description = "Source repository of the retraining trigger, already connected to Cloud Build: a repository URI (https://github.com/OWNER/REPO) or a 2nd-gen repository resource name (projects/P/locations/L/connections/C/repositories/R). Empty (the default) sets up no scheduled retraining."
  type        = string
  default     = ""
}

variable "retrain_source_ref" {
  description = "Git ref the retraining trigger builds from (refs/heads/BRANCH or refs/tags/TAG)."
  type        = string
  default     = "refs/heads/main"

  validation {
    condition     = can(regex("^refs/(heads|tags)/.+", var.retrain_source_ref))
    error_message = "retrain_source_ref must start with refs/heads/ or refs/tags/."
  }
}

variable "retrain_source_repo_type" {
  description = "Kind of retrain_source: GITHUB, BITBUCKET_SERVER, CLOUD_SOURCE_REPOSITORIES or UNKNOWN."
  type        = string
  default     = "GITHUB"

  validation {
    condition     = contains(["GITHUB", "BITBUCKET_SERVER", "CLOUD_SOURCE_REPOSITORIES", "UNKNOWN"], var.retrain_source_repo_type)
    error_message = "retrain_source_repo_type must be GITHUB, BITBUCKET_SERVER, CLOUD_SOURCE_REPOSITORIES or UNKNOWN."
  }
}

variable "retrain_trigger_name" {
  description = "Name of the retraining Cloud Build trigger and of the Cloud Scheduler job that runs it."
  type        = string
  default     = "gemma-sae-retrain"
}

variable "retrain_trigger_location" {
  description = "Cloud Build location of the trigger: global (1st-gen repository connections) or the region of a 2nd-gen connection."
  type        = string
  default     = "global"
}

variable "retrain_schedule" {
  description = "When retraining runs: a unix-cron schedule in retrain_time_zone (default Mondays 03:00)."
  type        = string
  default     = "0 3 * * 1"

  validation {
    condition     = length(split(" ", trimspace(var.retrain_schedule))) == 5
    error_message = "retrain_schedule must be a five-field cron schedule such as \"0 3 * * 1\"."
  }
}

variable "retrain_time_zone" {
  description = "Time zone (tz database name) of retrain_schedule."
  type        = string
  default     = "Etc/UTC"
}

variable "retrain_paused" {
  description = "Create the Cloud Scheduler job paused (the trigger can still be run by hand)."
  type        = bool
  default     = false
}

variable "retrain_stage" {
  description = "gemma-sae command that retraining runs: retrain (a new dated run under retrain_workdir, warm-started from the LATEST good run, which it replaces only on success), or a stage, e.g. pipeline, run in retrain_workdir itself."
  type        = string
  default     = "retrain"

  validation {
    condition     = contains(["retrain", "demo", "tokenize", "extract", "train", "report", "pipeline"], var.retrain_stage)
    error_message = "retrain_stage must be one of retrain, demo, tokenize, extract, train, report, pipeline."
  }
}

variable "retrain_config" {
  description = "Config file inside the image for retraining (its gs://YOUR_BUCKET paths are set through retrain_overrides)."
  type        = string
  default     = "configs/gemma2-2b-v5e-8.yaml"
}

variable "retrain_overrides" {
  description = "Config overrides (key=value, no spaces or quotes) for retraining, e.g. [\"model.preset=gs://BUCKET/presets/gemma2_2b_en\", \"tokenize.input=gs://BUCKET/corpus/*.jsonl\"]."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for word in var.retrain_overrides : can(regex("^[^'\\s]+=[^'\\s]*$", word))])
    error_message = "retrain_overrides must be key=value words without quotes or whitespace."
  }
}

variable "retrain_workdir" {
  description = "Base of the retraining runs (RETRAIN_WORKDIR/runs/YYYYMMDD-HHMMSS/ and RETRAIN_WORKDIR/LATEST); empty: gs://BUCKET/retrain."
  type        = string
  default     = ""

  validation {
    condition     = !can(regex("['\\s]", var.retrain_workdir))
    error_message = "retrain_workdir must not contain quotes or whitespace."
  }
}

variable "retrain_image_tag" {
  description = "Tag of the gemma-sae image that retraining runs (cloudbuild.yaml pushes :latest and :COMMIT_SHA)."
  type        = string
  default     = "latest"
}

variable "retrain_timeout_hours" {
  description = "Longest a retraining run may take, waiting for TPU capacity included; the slice is deleted then. The build gets 30 minutes more (Cloud Build allows 24 hours)."
  type        = number
  default     = 12

  validation {
    condition     = var.retrain_timeout_hours >= 1 && var.retrain_timeout_hours <= 23 && floor(var.retrain_timeout_hours) == var.retrain_timeout_hours
    error_message = "retrain_timeout_hours must be a whole number from 1 to 23."
  }
}

variable "retrain_max_attempts" {
  description = "How often retraining requests a new slice after a Spot preemption before it gives up."
  type        = number
  default     = 3

  validation {
    condition     = var.retrain_max_attempts >= 1 && floor(var.retrain_max_attempts) == var.retrain_max_attempts
    error_message = "retrain_max_attempts must be a whole number, at least 1."
  }
}

variable "retrain_status_prefix" {
  description = "Object prefix in the data bucket where retraining workers write their exit codes (the orchestrator can read only these objects)."
  type        = string
  default     = "retrain-status/"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]*/$", var.retrain_status_prefix))
    error_message = "retrain_status_prefix must be a single folder name ending in '/', e.g. retrain-status/."
  }
}

variable "retrain_builder_image" {
  description = "Image of the retraining build step (needs bash, base64 and gcloud with the compute tpus and storage commands)."
  type        = string
  default     = "gcr.io/google.com/cloudsdktool/cloud-sdk:slim"
}

variable "retrain_invoker_service_account_id" {
  description = "Account id of the service account that Cloud Scheduler runs the retraining trigger as."
  type        = string
  default     = "gemma-sae-retrain"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{4,28}[a-z0-9])$", var.retrain_invoker_service_account_id))
    error_message = "retrain_invoker_service_account_id must be 6-30 characters: lowercase letters, digits and '-', starting with a letter."
  }
}

variable "retrain_invoker_role_id" {
  description = "Id of the project custom role that lets the invoker run Cloud Build triggers."
  type        = string
  default     = "gemmaSaeRetrainInvoker"

  validation {
    condition     = can(regex("^[a-zA-Z0-9_.]{3,64}$", var.retrain_invoker_role_id))
    error_message = "retrain_invoker_role_id must be 3-64 letters, digits, '_' or '.'."
  }
}

variable "dataflow_service_account_id" {
  description = "Account id of the service account the tokenize stage's Dataflow workers run as."
  type        = string
  default     = "gemma-sae-dataflow"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{4,28}[a-z0-9])$", var.dataflow_service_account_id))
    error_message = "dataflow_service_account_id must be 6-30 characters: lowercase letters, digits and '-', starting with a letter."
  }
}

variable "dataflow_launchers" {
  description = "IAM members (user:..., group:..., serviceAccount:...) that launch the tokenize stage on Dataflow: they may create Dataflow jobs and act as the worker account. Empty: nobody beyond the project's owners."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.dataflow_launchers : can(regex("^(user|group|serviceAccount|domain):.+", m))])
    error_message = "dataflow_launchers must be IAM members such as user:me@example.com or serviceAccount:x@p.iam.gserviceaccount.com."
  }
}

variable "dataflow_launcher_role_id" {
  description = "Id of the project custom role that lets var.dataflow_launchers create and follow Dataflow jobs."
  type        = string
  default     = "gemmaSaeDataflowLauncher"
}
