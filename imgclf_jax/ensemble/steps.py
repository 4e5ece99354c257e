"""K members' train and eval steps as one compiled step (state stacked on a leading member axis).

Member i is exactly a plain run with seed ``seed + i`` (:func:`member_keys`):
the same init key, the same dropout key, and (unless the data is shared) its
own batches. Shapes, with K members and batch size B::

  EnsembleState.members: steps.TrainState with every leaf [K, ...]
  EnsembleState.active:  bool[K]   members that still train
  batch (own data):      image float32[K, B, H, W, 3], label int32[K, B], mask bool[K, B]
  batch (shared data):   image float32[B, H, W, 3], ... (one stream for all members)
  keys:                  key[K] dropout keys

A population (``ensemble.sweep``, :mod:`imgclf_jax.ensemble.population`) adds
``values``: ``{key: float32[K]}``, each member's swept values, mapped like the
states; ``hooks(member_values) -> population.Hooks`` builds that member's optimizer,
L2 factor, loss and batch transform from them inside the step (None: no sweep, the
shared `tx`, `l2`, `loss_fn`, `batch_transform`).

A member stops updating when it is made inactive (early stopping, decided on
the host between epochs) or, inside the step, when its loss or its new params (BatchNorm
statistics and EMA included) are not finite: then it keeps its whole state from before that
step and ``active`` turns False, so a NaN freezes one member and the others go on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from imgclf_jax import parallel, steps
from imgclf_jax.ensemble.mapping import map_members


@flax.struct.dataclass
class EnsembleState:
    """Stacked member states and which members still train (see the module docstring)."""

    members: steps.TrainState
    active: jax.Array


def member_seeds(seed: int, num_members: int) -> list[int]:
    """Member i's run seed: ``seed + i`` (what K separate runs with consecutive seeds use)."""
    return [seed + i for i in range(num_members)]


def member_keys(seed: int, num_members: int, seeds: list[int] | None = None) -> tuple[jax.Array, jax.Array]:
    """(init keys key[K], dropout keys key[K]): per member, ``split(key(seed + i))`` as a plain run does
    (or ``split(key(seeds[i]))`` for given run seeds, a population's)."""
    seeds = member_seeds(seed, num_members) if seeds is None else seeds
    pairs = [jax.random.split(jax.random.key(s)) for s in seeds]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


def select_members(mask: jax.Array, new: Any, old: Any) -> Any:
    """Per member, `new` where mask[i] else `old` (leaves [K, ...])."""
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def _all_finite(params: Any) -> jax.Array:
    """bool[K]: whether every value of member i's params is finite."""
    flags = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(params)]
    return functools.reduce(jnp.logical_and, flags)


def ensemble_train_step(state: EnsembleState, batch: dict, keys: jax.Array, values: dict | None = None, *,
                        model, tx, l2: float, mode: str, shared_data: bool, loss_fn=None,
                        batch_transform=None, ema_decay: float = 0.0, hooks=None) -> tuple[EnsembleState, dict]:
    """One optimizer update of every active member.

    `loss_fn`, `batch_transform` and `ema_decay` as in :func:`imgclf_jax.steps.train_step` (None/0 = the
    default loss, no transform, no EMA); each member has its own BatchNorm statistics and EMA (they are
    part of its stacked TrainState); the transform runs per member, with that member's key (so with shared
    data each member still draws its own transform).

    Returns:
      (new state, metrics with float32[K] sums ``loss_sum``, ``correct``, ``count``, and bool[K]
      ``updated`` (the member took this step), ``finite`` (its loss and new params are finite) and
      ``nan`` (it was active and is now frozen by a non-finite value)).
      Members that did not update report their metrics but must not be counted (``updated`` False).
    """
    num_members = state.active.shape[0]
    batch_axis = None if shared_data else 0
    if hooks is None:
        step_fn = functools.partial(steps.train_step, model=model, tx=tx, l2=l2, loss_fn=loss_fn,
                                    batch_transform=batch_transform, ema_decay=ema_decay)
        new, metrics = map_members(step_fn, mode, num_members, (0, batch_axis, 0))(state.members, batch, keys)
    else:  # a population: each member's optimizer, L2, loss and transform from its own values
        def member_step(member, member_batch, key, member_values):
            h = hooks(member_values)
            member_model = model if h.model is None else h.model  # a swept dropout rate: its own module
            return steps.train_step(member, member_batch, key, model=member_model, tx=h.tx, l2=h.l2,
                                    loss_fn=h.loss_fn,
                                    batch_transform=h.batch_transform, ema_decay=ema_decay)

        new, metrics = map_members(member_step, mode, num_members, (0, batch_axis, 0, 0))(
            state.members, batch, keys, values)
    finite = jnp.isfinite(metrics["loss_sum"]) & _all_finite((new.params, new.model_state, new.ema))
    updated = state.active & finite
    members = select_members(updated, new, state.members)
    nan = state.active & ~finite
    return EnsembleState(members=members, active=updated), dict(metrics, updated=updated, finite=finite, nan=nan)


def ensemble_eval_step(params: Any, batch: dict, values: dict | None = None, *, model, l2: float, mode: str,
                       loss_fn=None, eval_transform=None, hooks=None) -> tuple[dict, jax.Array]:
    """Every member on one shared batch (dropout off).

    `loss_fn` and `eval_transform` as in :func:`imgclf_jax.steps.eval_step` (None = off).

    Returns:
      (metrics with float32[K] sums as in :func:`imgclf_jax.steps.eval_step`,
      ``float32[K, B, num_classes]`` softmax probabilities).
    """
    num_members = jax.tree.leaves(params)[0].shape[0]
    if hooks is None:
        step_fn = functools.partial(steps.eval_step, model=model, l2=l2, loss_fn=loss_fn,
                                    eval_transform=eval_transform)
        return map_members(step_fn, mode, num_members, (0, None))(params, batch)

    def member_eval(member_params, member_batch, member_values):  # its own L2 and loss (label smoothing)
        h = hooks(member_values)
        member_model = model if h.model is None else h.model
        return steps.eval_step(member_params, member_batch, model=member_model, l2=h.l2, loss_fn=h.loss_fn,
                               eval_transform=eval_transform)

    return map_members(member_eval, mode, num_members, (0, None, 0))(params, batch, values)


def jit_train_step(model, tx, l2: float, mesh, mode: str, shared_data: bool, *, loss_fn=None,
                   batch_transform=None, ema_decay: float = 0.0, values: dict | None = None,
                   hooks=None) -> Callable:
    """:func:`ensemble_train_step` compiled over `mesh`: state replicated and donated, batch split on B.

    A population's `values` (``{key: float32[K]}``) and `hooks` are bound here: the values are an
    argument of the compiled step (replicated arrays), not constants in it. Call ``step(state, batch, keys)``.
    """
    rep = parallel.replicated(mesh)
    split = parallel.batch_sharded(mesh) if shared_data else parallel.member_batch_sharded(mesh)

    def step(state, batch, keys, member_values):
        return ensemble_train_step(state, batch, keys, member_values, model=model, tx=tx, l2=l2, mode=mode,
                                   shared_data=shared_data, loss_fn=loss_fn, batch_transform=batch_transform,
                                   ema_decay=ema_decay, hooks=hooks)

    compiled = jax.jit(step, in_shardings=(rep, split, rep, rep), out_shardings=(rep, rep), donate_argnums=(0,))
    bound = _device_values(values, rep)
    return lambda state, batch, keys: compiled(state, batch, keys, bound)


def jit_eval_step(model, l2: float, mesh, mode: str, *, loss_fn=None, eval_transform=None,
                  values: dict | None = None, hooks=None) -> Callable:
    """:func:`ensemble_eval_step` compiled over `mesh`: probabilities ``[K, B, C]`` split on B
    (a population's `values` and `hooks` bound as in :func:`jit_train_step`)."""
    rep = parallel.replicated(mesh)

    def step(params, batch, member_values):
        return ensemble_eval_step(params, batch, member_values, model=model, l2=l2, mode=mode, loss_fn=loss_fn,
                                  eval_transform=eval_transform, hooks=hooks)

    compiled = jax.jit(step, in_shardings=(rep, parallel.batch_sharded(mesh), rep),
                       out_shardings=(rep, parallel.member_batch_sharded(mesh)))
    bound = _device_values(values, rep)
    return lambda params, batch: compiled(params, batch, bound)


def _device_values(values: dict | None, sharding) -> dict:
    """A population's values as float32 device arrays ({} without one)."""
    return {key: parallel.replicate(np.asarray(v, np.float32), sharding) for key, v in (values or {}).items()}


def create_ensemble_state(model, tx, init_keys: jax.Array, image_size: int,
                          ema_decay: float = 0.0, values: dict | None = None, hooks=None) -> EnsembleState:
    """Member i initialized from ``init_keys[i]`` exactly as a plain run; all members active.

    A population's members each take their optimizer state from ``hooks(values_i).tx`` (the same tree for
    every member, see :func:`imgclf_jax.ensemble.population.member_hooks`)."""
    if hooks is None:
        members = jax.vmap(lambda key: steps.create_train_state(model, tx, key, image_size, ema_decay))(init_keys)
    else:
        members = jax.vmap(lambda key, v: steps.create_train_state(model, hooks(v).tx, key, image_size,
                                                                   ema_decay))(init_keys, values)
    return EnsembleState(members=members, active=jnp.ones(init_keys.shape[0], bool))
