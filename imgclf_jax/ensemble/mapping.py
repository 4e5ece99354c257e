"""How a per-member function runs over K stacked members inside one compiled step.

Modes (``config.ensemble.mapping``; the :data:`MAPPINGS` table):

- ``'vmap'``: ``jax.vmap`` over the member axis. On GPU this batches the K
  members' convolutions into one grouped convolution, which is what wins there.
- ``'unroll'``: a Python loop over members inside the traced function; XLA
  sees K independent copies of the step and compiles each convolution as a
  plain one (compile time grows with K).
- ``'map'``: ``jax.lax.map`` (a compiled loop; one copy of the step).
- ``'auto'``: :func:`default_mapping` for the backend.

Measured on this project's CPU machine (2-core AMD EPYC, jax 0.12, attempt 1's
train step with the CPU fast path, batch 32, 128x128, 2026-11-29;
``python -m benchmarks.ensemble`` reruns it), member-images/s:
K=2: vmap 98, map 3.7, unroll 163, two separate steps 160;
K=4: vmap 88, map 3.6, unroll 156, separate 151;
K=8: vmap 92, unroll 173, separate 166 (map: first step 74 s, skipped).
XLA:CPU turns the vmapped convolution into a grouped one that runs at about
half speed, and its convolutions inside a ``lax.map`` loop body lose their
fast path altogether; unrolled, the members run as fast as separate steps.
So 'auto' is 'unroll' on CPU and 'vmap' on other backends (on GPU, vmap's
batched kernels are what wins; not measured here: no GPU was lent).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from imgclf_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class MappingEntry:
    """One ``ensemble.mapping`` choice.

    Attributes:
      map: ``map(fn, num_members, in_axes) -> mapped fn`` (see :func:`map_members`).
      resolve: for an alias ('auto'): ``resolve(backend or None) -> the name it stands for``;
        None for a mode that is itself.
    """

    map: Callable[[Callable, int, tuple[int | None, ...]], Callable]
    resolve: Callable[[str | None], str] | None = None


MAPPINGS = Registry("ensemble.mapping")


def default_mapping(backend: str | None = None) -> str:
    """The mode 'auto' stands for on `backend` (default: jax's default backend): unroll on CPU, else vmap."""
    backend = backend or jax.default_backend()
    return "unroll" if backend == "cpu" else "vmap"


def resolve_mapping(mapping: str, backend: str | None = None) -> str:
    """The mode a :data:`MAPPINGS` name stands for: 'auto' -> :func:`default_mapping`; a mode is itself.

    Raises:
      ConfigError: an unknown name (the message lists the valid ones).
    """
    entry = MAPPINGS[mapping]
    return entry.resolve(backend) if entry.resolve else mapping


def map_members(fn: Callable, mode: str, num_members: int, in_axes: Sequence[int | None]) -> Callable:
    """``fn`` applied to each of `num_members` members, outputs stacked on a new leading axis.

    Args:
      fn: a per-member function of positional pytree arguments.
      mode: a :data:`MAPPINGS` name: 'vmap', 'unroll', 'map' or 'auto' (see the module docstring).
      num_members: K, the size of the member axis.
      in_axes: per argument, 0 (the argument is stacked: leading axis K) or None
        (shared by all members).

    Returns:
      A function of the same arguments whose outputs have a leading axis K.

    Raises:
      ConfigError: an unknown mode (the message lists the valid ones).
    """
    return MAPPINGS[mode].map(fn, num_members, tuple(in_axes))


def _pick(args, in_axes, i):
    return [jax.tree.map(lambda x: x[i], a) if axis == 0 else a for a, axis in zip(args, in_axes)]


def _vmap(fn: Callable, num_members: int, in_axes: tuple) -> Callable:
    return jax.vmap(fn, in_axes=in_axes)


def _unroll(fn: Callable, num_members: int, in_axes: tuple) -> Callable:
    def unrolled(*args):
        outputs = [fn(*_pick(args, in_axes, i)) for i in range(num_members)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)

    return unrolled


def _lax_map(fn: Callable, num_members: int, in_axes: tuple) -> Callable:
    def mapped(*args):
        stacked = [a for a, axis in zip(args, in_axes) if axis == 0]

        def body(member_args: list[Any]):
            it = iter(member_args)
            return fn(*[next(it) if axis == 0 else a for a, axis in zip(args, in_axes)])

        return jax.lax.map(body, stacked)

    return mapped


MAPPINGS.register("auto", MappingEntry(
    map=lambda fn, num_members, in_axes: map_members(fn, default_mapping(), num_members, in_axes),
    resolve=default_mapping))
MAPPINGS.register("vmap", MappingEntry(_vmap))
MAPPINGS.register("unroll", MappingEntry(_unroll))
MAPPINGS.register("map", MappingEntry(_lax_map))
