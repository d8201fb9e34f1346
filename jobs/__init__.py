"""Thin batch-job entry points; each parses config, calls `sae`, writes its manifest."""
