"""Storage and formats: URIs on local disk or GCS, stage manifests, model presets, and the SAELens
and Gemma Scope file formats."""
