"""Sparse autoencoders on Gemma activations: the library behind the batch jobs.

The public API (README, "Python API"):

    sae.load_config(path=None, overrides=())    the typed, validated config
    sae.train(config, force=False)              the whole train stage (`gemma-sae train`)
    sae.Trainer(saes=[sae.SaeSpec(...)], d_model=...).fit(x, steps=...)   SAEs fitted on arrays
    sae.evaluate(saes, x)                       held-out metrics on activation rows
    sae.load_sae(uri) / Sae.save(uri)           SAELens v6 files, local or gs://
    sae.steer(sae, feature, prompt, strengths)  generations with a feature's direction added

Attributes are imported on first use, so `import sae.config` (every job does) stays light.
Nothing here knows about jobs, command lines or cloud submission.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute)
_API = {
    "load_config": ("sae.config", "load"),
    "PipelineConfig": ("sae.config", "PipelineConfig"),
    "TrainConfig": ("sae.config", "TrainConfig"),
    "SaeSpec": ("sae.arch.spec", "SaeSpec"),
    "train": ("sae.training.run", "train"),
    "Trainer": ("sae.api", "Trainer"),
    "evaluate": ("sae.api", "evaluate"),
    "Sae": ("sae.io.saelens", "Sae"),
    "load_sae": ("sae.io.saelens", "Sae.load"),
    "steer": ("sae.analysis.steer", "steer"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sae' has no attribute {name!r}")
    module, attribute = _API[name]
    value: Any = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
