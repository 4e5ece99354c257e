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
- :func:`create_optimizer`: both from a config's ``optimizer`` section.

The loss lives in :mod:`imgclf_jax.losses`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from imgclf_jax.errors import ConfigError

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


def create_schedule(optimizer_config: Any) -> Callable[[jax.Array], jax.Array]:
    """The learning-rate schedule of a config's ``optimizer`` section: ``schedule(step) -> float32[]``."""
    o = optimizer_config
    if o.schedule == "constant":
        lr = jnp.float32(o.learning_rate)
        return lambda step: lr
    if o.schedule == "exponential_decay":
        return exponential_decay(o.learning_rate, o.decay_steps, o.decay_rate, o.staircase)
    raise ConfigError(f"config key 'optimizer.schedule' must be 'constant' or 'exponential_decay', "
                      f"got {o.schedule!r}")


def create_optimizer(optimizer_config: Any) -> tuple[optax.GradientTransformation, Callable]:
    """Builds the optimizer and its learning-rate schedule from a config's ``optimizer`` section.

    ``name``: 'keras_adam' (:func:`keras_adam`), 'adam' (``optax.adam`` with
    ``eps_root=0``) or 'adamw' (``optax.adamw`` with ``weight_decay``);
    ``schedule``: 'constant' or 'exponential_decay' (:func:`exponential_decay`).
    Every optimizer evaluates the schedule at the number of updates so far.

    Returns:
      (the ``optax.GradientTransformation``, ``schedule(step) -> float32[]`` for logging).
    """
    o = optimizer_config
    schedule = create_schedule(o)
    lr: ScalarOrSchedule = float(o.learning_rate) if o.schedule == "constant" else schedule
    if o.name == "keras_adam":
        tx = keras_adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.name == "adam":
        tx = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps, eps_root=0.0)
    elif o.name == "adamw":
        tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, eps_root=0.0, weight_decay=o.weight_decay)
    else:
        raise ConfigError(f"config key 'optimizer.name' must be one of ('keras_adam', 'adam', 'adamw'), "
                          f"got {o.name!r}")
    return tx, schedule
