"""The device mesh: a data axis over tokens and a model axis over SAE latents."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sae.errors import ConfigError

DATA, MODEL = "data", "model"


def make_mesh(data: int = -1, model: int = 1, devices: list | None = None) -> Mesh:
    """A (data, model) mesh; `data=-1` uses every device not taken by the model axis."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) % model:
        raise ConfigError(f"mesh model axis {model} does not divide {len(devices)} devices")
    if data == -1:
        data = len(devices) // model
    if data * model > len(devices):
        raise ConfigError(
            f"mesh {data}x{model} needs {data * model} devices, only {len(devices)} available"
        )
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def named(mesh: Mesh, *spec: str | None) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (tokens or sequences) split over the data axis."""
    return named(mesh, DATA)


def replicated(mesh: Mesh) -> NamedSharding:
    return named(mesh)
