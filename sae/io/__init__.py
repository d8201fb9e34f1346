"""Storage and formats: URIs on local disk or GCS, stage manifests, model presets and the model
sources that become them (.gguf, Hugging Face, hubs), and the SAELens and Gemma Scope formats."""
