"""Device mesh and shardings for data parallelism over all local devices (``jax.sharding``).

Params and optimizer state are replicated; every batch array is split along
its batch axis over the mesh axis 'data': the leading axis, or the second one
for an ensemble's stacked batch ``[K, B, ...]`` (members whole on every device).
With one device this is a plain single-device jit.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imgclf_jax.errors import ConfigError


def make_mesh(batch_size: int, devices: list | None = None) -> Mesh:
    """A 1-D mesh ('data',) over the most local devices that divide `batch_size`.

    A batch of 32 on 3 devices uses 2 of them (with a warning), so every device
    gets an equal share and results do not depend on the device count.

    In a multi-process run (:mod:`imgclf_jax.distributed`) the mesh spans every process's devices,
    ordered by process, so process p's share of a global batch is its p-th block of rows.

    Raises:
      ConfigError: multi-process, and `batch_size` is not a multiple of the run's device count.
    """
    if devices is None and jax.process_count() > 1:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        if batch_size % len(devices):
            raise ConfigError(
                f"train.batch_size {batch_size} must be a multiple of the run's {len(devices)} devices "
                f"({jax.process_count()} processes x {jax.local_device_count()}) in a multi-process run")
        return Mesh(np.array(devices), ("data",))
    devices = list(devices if devices is not None else jax.local_devices())
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    if count < len(devices):
        warnings.warn(f"batch size {batch_size} is not divisible by {len(devices)} devices; using {count}")
    return Mesh(np.array(devices[:count]), ("data",))


def local_devices(mesh: Mesh) -> list:
    """The mesh's devices that this process drives (all of them for a single process)."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (params, opt_state, scalars)."""
    return NamedSharding(mesh, P())


def replicate(tree, sharding: NamedSharding):
    """Places values that are the same on every process (numpy arrays, single-device jax arrays,
    PRNG key arrays) as global arrays with the replicated `sharding` (:func:`replicated`).

    ``jax.device_put`` alone refuses a committed jax array onto devices of other processes; host
    copies are placed instead (jax checks that every process passes the same values).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(leaf)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return jax.device_put(np.asarray(leaf), sharding)

    return jax.tree.map(put, tree)


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh axis 'data'."""
    return NamedSharding(mesh, P("data"))


def member_batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a stacked ensemble batch ``[K, B, ...]``: members whole, B split over 'data'."""
    return NamedSharding(mesh, P(None, "data"))


def shard_batch(batch: dict, mesh: Mesh, members: bool = False) -> dict:
    """Places a host batch (dict of numpy arrays ``[B, ...]``, or ``[K, B, ...]`` with `members`)
    on the mesh, split along B.

    In a multi-process run the host batch is this process's share (``B / num_processes`` rows, its
    block of the global batch: :func:`imgclf_jax.data.pipeline.process_share`) and the result is the
    global batch, one array over every process's devices (``jax.make_array_from_process_local_data``).
    """
    sharding = member_batch_sharded(mesh) if members else batch_sharded(mesh)
    if jax.process_count() == 1:
        return {key: jax.device_put(value, sharding) for key, value in batch.items()}
    axis = 1 if members else 0
    out = {}
    for key, value in batch.items():
        shape = list(value.shape)
        shape[axis] *= jax.process_count()
        out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
    return out
