"""Cloud orchestration: TPU submission and its queue, gcloud commands, scheduled retraining and
the TPU VM startup script."""
