"""The demo: a generated corpus and a tiny Gemma trained on it. Examples and test fixtures, not the
core: nothing else in `sae` imports it."""
