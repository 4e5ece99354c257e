"""Optimizers and learning-rate schedules, with Keras's semantics where they matter.

Source: ``../shared/seed-attempts.md`` ("What every attempt shares"): Adam with
beta1 0.9, beta2 0.999, epsilon 1e-7 in Keras's "epsilon hat" form;
``ExponentialDecay(initial, decay_steps, rate, staircase)`` counted in optimizer
updates (rates above 1 grow).

- :func:`keras_adam`: Keras's Adam, epsilon added to the *uncorrected*
  second-moment root (``optimizer.name = 'keras_adam'``, the reference configs);
- ``'adam'``: ``optax.adam(eps_root=0)``, epsilon added after bias correction;
- ``'adamw'``: ``optax.adamw``, decoupled weight decay (multiplied by the
  learning rate, optax's convention);
- :func:`exponential_decay`: Keras's ``ExponentialDecay``;
- :data:`OPTIMIZERS` / :data:`SCHEDULES`: the ``optimizer.name`` / ``optimizer.schedule``
  tables; each entry declares the ``optimizer.*`` keys it reads, with defaults
  and value checks (the config schema and its validation read them);
- :func:`create_optimizer`: both from a config's ``optimizer`` section.

The loss lives in :mod:`imgclf_jax.losses`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import Checks, Registry, check_values

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


# --------------------------------------------------------------------------- Keras Adam


class KerasAdamState(NamedTuple):
    """State of :func:`keras_adam`.

    Attributes:
      count: int32[] updates applied so far (Keras's ``optimizer.iterations``).
      mu: first moments m, same tree and dtypes as the params.
      nu: second moments v (uncorrected), same tree and dtypes as the params.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def keras_adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
) -> optax.GradientTransformation:
    r"""Adam exactly as Keras (``keras.optimizers.Adam``, TF and Keras 3) computes it.

    With ``t = count + 1`` (1-based update number) and gradient ``g``::

      m   <- m + (g - m) * (1 - b1)          # = b1 m + (1 - b1) g
      v   <- v + (g**2 - v) * (1 - b2)       # = b2 v + (1 - b2) g**2
      lr_t = lr(count) * sqrt(1 - b2**t) / (1 - b1**t)
      update = -(m * lr_t) / (sqrt(v) + eps)

    Epsilon is added to the uncorrected root sqrt(v): the "epsilon hat" of
    Kingma & Ba, *Adam: A Method for Stochastic Optimization* (ICLR 2015), in
    the formula just before Section 2.1. ``optax.adam`` instead computes
    ``m_hat / (sqrt(v_hat) + eps)`` (epsilon after bias correction); the two are
    equal up to eps's scale, ``eps_keras = eps_optax * sqrt(1 - b2**t)``, which
    matters only for gradients near eps. The arithmetic order (moment updates
    as ``m + (g - m)(1 - b1)``, the product ``m * lr_t`` first) follows Keras 3's
    ``keras/src/optimizers/adam.py`` ``update_step``.

    Args:
      learning_rate: a float, or a schedule called with ``count`` (updates so far,
        0-based: Keras's ``iterations``), e.g. :func:`exponential_decay`.
      b1: decay of the first moment (Keras ``beta_1``).
      b2: decay of the second moment (Keras ``beta_2``).
      eps: Keras's ``epsilon`` (default 1e-7, Keras's default).

    Returns:
      An ``optax.GradientTransformation`` whose updates are to be added to the
      params (``optax.apply_updates``).
    """

    def init_fn(params: optax.Params) -> KerasAdamState:
        return KerasAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree_utils.tree_zeros_like(params),
            nu=optax.tree_utils.tree_zeros_like(params),
        )

    def update_fn(updates: optax.Updates, state: KerasAdamState, params: optax.Params | None = None):
        del params
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        t = (state.count + 1).astype(jnp.float32)
        alpha = lr * jnp.sqrt(1 - jnp.power(jnp.float32(b2), t)) / (1 - jnp.power(jnp.float32(b1), t))
        mu = jax.tree.map(lambda g, m: m + (g - m) * (1 - b1), updates, state.mu)
        nu = jax.tree.map(lambda g, v: v + (jnp.square(g) - v) * (1 - b2), updates, state.nu)
        new_updates = jax.tree.map(
            lambda m, v: (-(m * alpha.astype(m.dtype)) / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        count = optax.safe_int32_increment(state.count)
        return new_updates, KerasAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- schedules


def exponential_decay(
    initial: float, decay_steps: int, rate: float, staircase: bool = False
) -> Callable[[jax.Array], jax.Array]:
    """Keras's ``ExponentialDecay``: ``lr(step) = initial * rate ** (step / decay_steps)``.

    ``step`` counts optimizer updates so far (0-based); with ``staircase`` the
    exponent is ``floor(step / decay_steps)``. A rate above 1 makes the rate grow
    (attempts 4 and 5 of ``../shared/seed-attempts.md`` did that; it is kept).
    Computed in float32, as Keras does.

    Equals ``optax.exponential_decay(initial, decay_steps, rate, staircase=staircase)``
    (with its defaults transition_begin=0, end_value=None it applies no clipping,
    also for rate > 1); written out here so the Keras formula is explicit and
    does not depend on optax's extra options.

    Returns:
      ``schedule(step) -> float32[]``.
    """
    if decay_steps < 1:
        raise ValueError(f"exponential_decay needs decay_steps >= 1, got {decay_steps}")
    initial32, steps32, rate32 = jnp.float32(initial), jnp.float32(decay_steps), jnp.float32(rate)

    def schedule(step: jax.Array) -> jax.Array:
        p = jnp.asarray(step).astype(jnp.float32) / steps32
        if staircase:
            p = jnp.floor(p)
        return initial32 * jnp.power(rate32, p)

    return schedule


# --------------------------------------------------------------------------- tables

def _check_keys(optimizer_config: Any, checks: Checks) -> None:
    check_values(optimizer_config, "optimizer", checks)


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """One ``optimizer.name`` choice: how to build it and the optimizer-section keys it reads.

    Attributes:
      create: ``create(optimizer_config, learning_rate) -> optax.GradientTransformation``;
        ``learning_rate`` is a float or a schedule of the updates so far (what the
        schedule entry hands the optimizer, see :attr:`ScheduleEntry.constant`).
      keys: ``{key: default}`` of the ``optimizer.*`` keys `create` reads (besides
        ``learning_rate``); the config schema's optimizer section is the union of every
        entry's keys, and a key the chosen entry does not read must stay at its default.
      checks: ``{key: (ok(value), 'what it must be')}`` for keys of `keys`.
    """

    create: Callable[[Any, ScalarOrSchedule], optax.GradientTransformation]
    keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checks: Checks = dataclasses.field(default_factory=dict)

    def validate(self, optimizer_config: Any) -> None:
        """Checks the values of this entry's keys. Raises ConfigError naming the key."""
        _check_keys(optimizer_config, self.checks)


@dataclasses.dataclass(frozen=True)
class ScheduleEntry:
    """One ``optimizer.schedule`` choice: how to build it and the optimizer-section keys it reads.

    Attributes:
      create: ``create(optimizer_config) -> schedule(step int[]) -> float32[]`` (step: updates so far).
      keys: ``{key: default}`` of the ``optimizer.*`` keys `create` reads (besides
        ``learning_rate``); as for :attr:`OptimizerEntry.keys`.
      checks: ``{key: (ok(value), 'what it must be')}`` for keys of `keys`.
      constant: True if the rate never changes: the optimizer then gets the float
        ``optimizer.learning_rate`` itself, not the schedule (optax scales by a constant).
    """

    create: Callable[[Any], Callable[[jax.Array], jax.Array]]
    keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checks: Checks = dataclasses.field(default_factory=dict)
    constant: bool = False

    def validate(self, optimizer_config: Any) -> None:
        """Checks the values of this entry's keys. Raises ConfigError naming the key."""
        _check_keys(optimizer_config, self.checks)


OPTIMIZERS = Registry("optimizer.name")
SCHEDULES = Registry("optimizer.schedule")

_ADAM_KEYS = {"b1": 0.9, "b2": 0.999, "eps": 1e-7}  # Keras's defaults (epsilon 1e-7)
_ADAM_CHECKS: Checks = {
    "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": (lambda v: v >= 0, ">= 0"),
}

OPTIMIZERS.register("keras_adam", OptimizerEntry(
    create=lambda o, lr: keras_adam(lr, b1=o.b1, b2=o.b2, eps=o.eps),
    keys=_ADAM_KEYS, checks=_ADAM_CHECKS))
OPTIMIZERS.register("adam", OptimizerEntry(
    create=lambda o, lr: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps, eps_root=0.0),
    keys=_ADAM_KEYS, checks=_ADAM_CHECKS))
OPTIMIZERS.register("adamw", OptimizerEntry(
    create=lambda o, lr: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, eps_root=0.0,
                                     weight_decay=o.weight_decay),
    keys={**_ADAM_KEYS, "weight_decay": 0.0},  # decoupled, multiplied by the learning rate (optax)
    checks={**_ADAM_CHECKS, "weight_decay": (lambda v: v >= 0, ">= 0")}))


def _constant(o: Any) -> Callable[[jax.Array], jax.Array]:
    lr = jnp.float32(o.learning_rate)
    return lambda step: lr


SCHEDULES.register("constant", ScheduleEntry(create=_constant, constant=True))
SCHEDULES.register("exponential_decay", ScheduleEntry(
    create=lambda o: exponential_decay(o.learning_rate, o.decay_steps, o.decay_rate, o.staircase),
    # decay_steps: optimizer updates (not epochs); lr = initial * rate ** (step / decay_steps), > 1 grows
    keys={"decay_steps": 1, "decay_rate": 1.0, "staircase": False},
    checks={"decay_steps": (lambda v: v >= 1, ">= 1 update"), "decay_rate": (lambda v: v > 0, "> 0")}))


def create_schedule(optimizer_config: Any) -> Callable[[jax.Array], jax.Array]:
    """The learning-rate schedule of a config's ``optimizer`` section: ``schedule(step) -> float32[]``.

    Raises:
      ConfigError: ``optimizer.schedule`` is not in :data:`SCHEDULES` (the message lists the names).
    """
    return SCHEDULES[optimizer_config.schedule].create(optimizer_config)


def create_optimizer(optimizer_config: Any) -> tuple[optax.GradientTransformation, Callable]:
    """Builds the optimizer and its learning-rate schedule from a config's ``optimizer`` section.

    ``name`` picks an :data:`OPTIMIZERS` entry ('keras_adam': :func:`keras_adam`;
    'adam': ``optax.adam`` with ``eps_root=0``; 'adamw': ``optax.adamw`` with
    ``weight_decay``), ``schedule`` a :data:`SCHEDULES` entry ('constant' or
    'exponential_decay': :func:`exponential_decay`). Every optimizer evaluates the
    schedule at the number of updates so far.

    Returns:
      (the ``optax.GradientTransformation``, ``schedule(step) -> float32[]`` for logging).

    Raises:
      ConfigError: an unknown ``name`` or ``schedule`` (the message lists the names).
    """
    o = optimizer_config
    entry = OPTIMIZERS[o.name]
    schedule_entry = SCHEDULES[o.schedule]
    schedule = schedule_entry.create(o)
    lr: ScalarOrSchedule = float(o.learning_rate) if schedule_entry.constant else schedule
    return entry.create(o, lr), schedule

