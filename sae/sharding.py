"""The device mesh: a data axis over tokens and a model axis over SAE latents (and, with
`model.mesh_model`, over the language model's weights)."""

from __future__ import annotations

import os

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


def weight_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """A language-model weight split over the mesh's model axis (tensor parallelism): along
    its largest dimension that the axis divides (the vocabulary of the embedding, the hidden
    units of an MLP, ...), so each device holds 1/model of it; replicated when the model axis
    is 1 or no dimension divides (a few small norm scales). XLA partitions the matmuls and
    adds the collectives."""
    model = mesh.shape[MODEL]
    axes = [i for i, size in enumerate(shape) if model > 1 and size % model == 0]
    if not axes:
        return replicated(mesh)
    axis = max(axes, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = MODEL
    return named(mesh, *spec)


def place_weights(weights, mesh: Mesh):
    """(the weights on the mesh, their shardings), each weight split by `weight_sharding`."""
    shardings = jax.tree.map(lambda w: weight_sharding(tuple(w.shape), mesh), weights)
    return jax.device_put(weights, shardings), shardings


def bytes_per_device(weights) -> int:
    """The bytes of `weights` held on the first device (each weight's shard there)."""
    device = jax.devices()[0]
    total = 0
    for weight in jax.tree.leaves(weights):
        for shard in weight.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (tokens or sequences) split over the data axis."""
    return named(mesh, DATA)


def replicated(mesh: Mesh) -> NamedSharding:
    return named(mesh)


class HostMax:
    """The maximum of one integer from every host, as a small collective on the mesh that
    every host dispatches in the same order as its other computations. Returns a replicated
    device scalar: int() waits for the work queued before it, nothing more."""

    def __init__(self, mesh: Mesh) -> None:
        self.sharding = named(mesh, (DATA, MODEL))
        self.size = mesh.devices.size
        self._max = jax.jit(jax.numpy.max, out_shardings=replicated(mesh))

    def __call__(self, value: int) -> jax.Array:
        votes = jax.make_array_from_callback(
            (self.size,),
            self.sharding,
            lambda index: np.full(len(range(*index[0].indices(self.size))), value, np.int32),
        )
        return self._max(votes)


def init_distributed() -> None:
    """Join the hosts of a multi-host slice into one JAX runtime, before any device is used.

    On a multi-host TPU VM slice (v5e-16 and up) JAX finds its peers from the TPU metadata;
    elsewhere JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID name them. A
    single host needs nothing. Several CPU processes (the multi-host test) talk over gloo,
    jax's default `jax_cpu_collectives_implementation`, so nothing is set for them either.
    """
    import jax

    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
