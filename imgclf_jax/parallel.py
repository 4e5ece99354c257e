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


def make_mesh(batch_size: int, devices: list | None = None) -> Mesh:
    """A 1-D mesh ('data',) over the most local devices that divide `batch_size`.

    A batch of 32 on 3 devices uses 2 of them (with a warning), so every device
    gets an equal share and results do not depend on the device count.
    """
    devices = list(devices if devices is not None else jax.local_devices())
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    if count < len(devices):
        warnings.warn(f"batch size {batch_size} is not divisible by {len(devices)} devices; using {count}")
    return Mesh(np.array(devices[:count]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (params, opt_state, scalars)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh axis 'data'."""
    return NamedSharding(mesh, P("data"))


def member_batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a stacked ensemble batch ``[K, B, ...]``: members whole, B split over 'data'."""
    return NamedSharding(mesh, P(None, "data"))


def shard_batch(batch: dict, mesh: Mesh, members: bool = False) -> dict:
    """Places a host batch (dict of numpy arrays ``[B, ...]``, or ``[K, B, ...]`` with `members`)
    on the mesh, split along B."""
    sharding = member_batch_sharded(mesh) if members else batch_sharded(mesh)
    return {key: jax.device_put(value, sharding) for key, value in batch.items()}
