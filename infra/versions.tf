terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 7.0"
    }
    google-beta = {
      source  = "hashicorp/google-beta"
      version = "~> 7.0"
    }
  }
}

provider "google" {
  project        = var.project_id
  region         = var.region
  zone           = var.zone
  default_labels = var.labels
}

# Cloud TPU VMs (google_tpu_v2_vm in tpu.tf) are google-beta resources.
provider "google-beta" {
  project        = var.project_id
  region         = var.region
  zone           = var.zone
  default_labels = var.labels
}
