# A private network for TPU VMs: workers get no external IP and reach Cloud Storage,
# Artifact Registry and the other Google APIs through Private Google Access.
resource "google_compute_network" "tpu" {
  name                    = var.network_name
  description             = "gemma-sae TPU VMs (internal IPs only)."
  auto_create_subnetworks = false

  depends_on = [google_project_service.enabled]
}

resource "google_compute_subnetwork" "tpu" {
  name                     = var.network_name
  description              = "TPU VM workers, with Private Google Access."
  region                   = var.region
  network                  = google_compute_network.tpu.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.1
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# The workers of a multi-host slice talk to each other (jax.distributed, data-center network).
resource "google_compute_firewall" "tpu_internal" {
  name        = "${var.network_name}-internal"
  description = "Traffic between the workers of a TPU slice."
  network     = google_compute_network.tpu.name
  direction   = "INGRESS"
  priority    = 1000

  source_ranges = [var.subnet_cidr]

  allow {
    protocol = "tcp"
  }
  allow {
    protocol = "udp"
  }
  allow {
    protocol = "icmp"
  }

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}

# SSH only through Identity-Aware Proxy (gcloud compute tpus tpu-vm ssh --tunnel-through-iap).
resource "google_compute_firewall" "tpu_iap_ssh" {
  count = var.allow_iap_ssh ? 1 : 0

  name        = "${var.network_name}-iap-ssh"
  description = "SSH to TPU VM workers from Identity-Aware Proxy only."
  network     = google_compute_network.tpu.name
  direction   = "INGRESS"
  priority    = 1000

  source_ranges = ["35.235.240.0/20"]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}
