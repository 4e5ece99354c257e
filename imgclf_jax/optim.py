"""Optimizers and learning-rate schedules, with Keras's semantics where they matter.

Source: ``../shared/seed-attempts.md`` ("What every attempt shares"): Adam with
beta1 0.9, beta2 0.999, epsilon 1e-7 in Keras's "epsilon hat" form;
``ExponentialDecay(initial, decay_steps, rate, staircase)`` counted in optimizer
updates (rates above 1 grow).

- :func:`keras_adam`: Keras's Adam, epsilon added to the *uncorrected*
  second-moment root (``optimizer.name = 'keras_adam'``, the reference configs);
- ``'adam'``: ``optax.adam(eps_root=0)``, epsilon added after bias correction;
- ``'adamw'``: ``optax.adamw``, decoupled weight decay (multiplied by the
  learning rate, optax's convention) on the kernels only (:func:`kernel_mask`);
- ``'sgd'``: :func:`sgdw`, SGD with (optionally Nesterov) momentum and decoupled
  weight decay on the kernels only (Loshchilov & Hutter 2019's SGDW);
- :func:`exponential_decay`: Keras's ``ExponentialDecay``;
- ``'warmup_cosine'`` and ``'one_cycle'``: epoch-based schedules (:func:`warmup_cosine`,
  :func:`one_cycle`), converted to updates with the run's steps per epoch;
- :data:`OPTIMIZERS` / :data:`SCHEDULES`: the ``optimizer.name`` / ``optimizer.schedule``
  tables; each entry declares the ``optimizer.*`` keys it reads, with defaults
  and value checks (the config schema and its validation read them);
- :func:`create_optimizer`: both from a config's ``optimizer`` section.

The loss lives in :mod:`imgclf_jax.losses`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import Checks, Registry, check_values, is_zero

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


# --------------------------------------------------------------------------- SGD, weight decay


def kernel_mask(params: optax.Params) -> Any:
    """The leaves weight decay applies to: True for ndim >= 2 (conv and dense kernels), False for
    biases and BatchNorm's scale and bias (ndim 1). Same tree as `params` (bools)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def sgdw(learning_rate: ScalarOrSchedule, momentum: float = 0.9, nesterov: bool = False,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
    r"""SGD with momentum (optionally Nesterov) and decoupled weight decay on the kernels.

    With gradient ``g``, momentum ``mu``, decay ``wd`` and ``lr(t)`` (t = updates so far)::

      m      <- g + mu m                                  # optax.trace
      d       = m              (nesterov=False)
              = g + mu m       (nesterov=True; Sutskever et al. 2013, as optax.sgd computes it)
      update  = -lr(t) (d + wd * param)                   # wd only on kernel_mask leaves

    The decay is added after the momentum, not fed through it: Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization" (ICLR 2019), SGDW (their Algorithm 1 with the
    schedule multiplier folded into lr(t)), the same form as ``optax.adamw``.
    ``optax.chain(optax.trace(mu, nesterov), optax.add_decayed_weights(wd, kernel_mask),
    optax.scale_by_learning_rate(lr))``; with ``wd == 0`` the decay step is left out, so the
    result is ``optax.sgd(lr, momentum, nesterov)`` exactly.

    Args:
      learning_rate: a float, or a schedule of the updates so far.
      momentum: mu in [0, 1).
      nesterov: Nesterov momentum.
      weight_decay: wd >= 0 (per unit learning rate); a Python number, or a scalar array (a
        population member's value, :mod:`imgclf_jax.ensemble.population`), for which the decay step
        is always built (adding ``0 * param`` when wd is 0, which changes nothing).

    Returns:
      An ``optax.GradientTransformation`` (updates to add to the params).
    """
    parts = [optax.trace(decay=momentum, nesterov=nesterov)]
    if not is_zero(weight_decay):  # an array (a population's per-member value) keeps the step even at 0
        parts.append(optax.add_decayed_weights(weight_decay, mask=kernel_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


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


def epochs_to_updates(epochs: float, steps_per_epoch: int) -> int:
    """``epochs`` (a float) in optimizer updates: ``epochs * steps_per_epoch`` rounded to the nearest
    update (halves up)."""
    return int(math.floor(epochs * steps_per_epoch + 0.5))


def warmup_cosine(learning_rate: float, warmup_steps: int, last_step: int,
                  final_fraction: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0, then cosine decay to ``final_fraction * learning_rate`` at `last_step`.

    ``lr(s) = learning_rate * s / warmup_steps`` for ``s <= warmup_steps`` (Goyal et al. 2017,
    "Accurate, Large Minibatch SGD", gradual warmup; the first update, s = 0, has rate 0), then
    ``learning_rate * (f + (1 - f) * (1 + cos(pi * (s - w) / (last_step - w))) / 2)`` (Loshchilov &
    Hutter 2017, SGDR, without restarts), and ``f * learning_rate`` after `last_step`.
    ``optax.warmup_cosine_decay_schedule(0, learning_rate, w, last_step, f * learning_rate)``;
    ``optax.cosine_decay_schedule`` when ``warmup_steps == 0`` (it starts at learning_rate).

    Args:
      learning_rate: the peak rate.
      warmup_steps: w >= 0 updates of warmup.
      last_step: the step (updates so far, 0-based) of the run's last update; > warmup_steps.
      final_fraction: f in [0, 1].

    Returns:
      ``schedule(step int[]) -> float32[]``.
    """
    if not 0 <= warmup_steps < last_step:
        raise ValueError(f"warmup_cosine needs 0 <= warmup_steps < last_step, got {warmup_steps}, {last_step}")
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, last_step, alpha=final_fraction)
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, last_step,
                                              end_value=final_fraction * learning_rate)


def one_cycle(learning_rate: float, warmup_steps: int, last_step: int, div_factor: float = 25.0,
              final_div_factor: float = 1e4) -> Callable[[jax.Array], jax.Array]:
    """The one-cycle schedule (Smith & Topin 2018, "Super-Convergence"), with cosine phases.

    From ``learning_rate / div_factor`` at step 0 up to ``learning_rate`` at `warmup_steps`, then
    down to ``learning_rate / (div_factor * final_div_factor)`` at `last_step` (and after), each
    phase a half cosine: PyTorch's ``OneCycleLR`` (anneal_strategy 'cos', no momentum cycling) and
    ``optax.cosine_onecycle_schedule``, whose own construction is used here with the phase
    boundaries given in updates (``optax.piecewise_interpolate_schedule('cosine', ...)``:
    ``cosine_onecycle_schedule`` takes a fraction and truncates ``fraction * steps``).
    Smith & Topin's paper used linear phases; cosine ones are the libraries' default.

    Args:
      learning_rate: the peak rate.
      warmup_steps: updates of the rising phase, >= 1 and < last_step.
      last_step: the step (updates so far, 0-based) of the run's last update.
      div_factor, final_div_factor: >= 1.

    Returns:
      ``schedule(step int[]) -> float32[]``.
    """
    if not 1 <= warmup_steps < last_step:
        raise ValueError(f"one_cycle needs 1 <= warmup_steps < last_step, got {warmup_steps}, {last_step}")
    return optax.piecewise_interpolate_schedule(
        "cosine", learning_rate / div_factor,
        {warmup_steps: div_factor, last_step: 1.0 / (div_factor * final_div_factor)})


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
      create: ``create(optimizer_config, steps_per_epoch, num_epochs) -> schedule(step int[]) -> float32[]``
        (step: updates so far; steps_per_epoch: the run's updates per epoch, ceil(resampled rows /
        batch size); num_epochs: ``train.num_epochs``, so the run's last update is step
        ``steps_per_epoch * num_epochs - 1``). Raises ConfigError for settings the run cannot meet.
      keys: ``{key: default}`` of the ``optimizer.*`` keys `create` reads (besides
        ``learning_rate``); as for :attr:`OptimizerEntry.keys`.
      checks: ``{key: (ok(value), 'what it must be')}`` for keys of `keys`.
      constant: True if the rate never changes: the optimizer then gets the float
        ``optimizer.learning_rate`` itself, not the schedule (optax scales by a constant).
      run_length: True if the rates depend on ``train.num_epochs`` (the run's last update): then
        resuming a run with another ``train.num_epochs`` is refused (:mod:`imgclf_jax.workdir`), since
        the updates already made followed the other length's schedule.
    """

    create: Callable[[Any, int, int], Callable[[jax.Array], jax.Array]]
    keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checks: Checks = dataclasses.field(default_factory=dict)
    constant: bool = False
    run_length: bool = False

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
_WEIGHT_DECAY_CHECK = {"weight_decay": (lambda v: v >= 0, ">= 0")}
OPTIMIZERS.register("adamw", OptimizerEntry(
    create=lambda o, lr: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, eps_root=0.0,
                                     weight_decay=o.weight_decay, mask=kernel_mask),
    # decoupled, multiplied by the learning rate (optax); kernels only (kernel_mask)
    keys={**_ADAM_KEYS, "weight_decay": 0.0},
    checks={**_ADAM_CHECKS, **_WEIGHT_DECAY_CHECK}))
OPTIMIZERS.register("sgd", OptimizerEntry(
    create=lambda o, lr: sgdw(lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay),
    # momentum mu (optax.trace), Nesterov's form, decoupled weight decay on the kernels (SGDW)
    keys={"momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    checks={"momentum": (lambda v: 0 <= v < 1, "in [0, 1)"), **_WEIGHT_DECAY_CHECK}))


def _constant(o: Any, steps_per_epoch: int, num_epochs: int) -> Callable[[jax.Array], jax.Array]:
    del steps_per_epoch, num_epochs
    lr = jnp.float32(o.learning_rate)
    return lambda step: lr


def _run_steps(o: Any, steps_per_epoch: int, num_epochs: int, least_warmup: int) -> tuple[int, int]:
    """(warmup updates, the last update's step) of the run, or a ConfigError naming the keys."""
    if steps_per_epoch < 1 or num_epochs < 1:
        raise ValueError(f"a schedule needs steps_per_epoch >= 1 and num_epochs >= 1, got "
                         f"{steps_per_epoch}, {num_epochs}")
    warmup, last = epochs_to_updates(o.warmup_epochs, steps_per_epoch), steps_per_epoch * num_epochs - 1
    if not least_warmup <= warmup < last:
        raise ConfigError(
            f"config key 'optimizer.warmup_epochs' ({o.warmup_epochs!r} epochs = {warmup} updates at "
            f"{steps_per_epoch} updates per epoch) must give {least_warmup} to {last - 1} updates for "
            f"optimizer.schedule={o.schedule!r}: the run has {last + 1} updates (train.num_epochs={num_epochs})")
    return warmup, last


def _warmup_cosine(o: Any, steps_per_epoch: int, num_epochs: int) -> Callable[[jax.Array], jax.Array]:
    warmup, last = _run_steps(o, steps_per_epoch, num_epochs, least_warmup=0)
    return warmup_cosine(o.learning_rate, warmup, last, o.final_lr_fraction)


def _one_cycle(o: Any, steps_per_epoch: int, num_epochs: int) -> Callable[[jax.Array], jax.Array]:
    warmup, last = _run_steps(o, steps_per_epoch, num_epochs, least_warmup=1)
    return one_cycle(o.learning_rate, warmup, last, o.div_factor, o.final_div_factor)


_WARMUP = ({"warmup_epochs": 0.0}, {"warmup_epochs": (lambda v: v >= 0, ">= 0 epochs")})

SCHEDULES.register("constant", ScheduleEntry(create=_constant, constant=True))
SCHEDULES.register("exponential_decay", ScheduleEntry(
    create=lambda o, steps_per_epoch, num_epochs: exponential_decay(o.learning_rate, o.decay_steps, o.decay_rate,
                                                                    o.staircase),
    # decay_steps: optimizer updates (not epochs); lr = initial * rate ** (step / decay_steps), > 1 grows
    keys={"decay_steps": 1, "decay_rate": 1.0, "staircase": False},
    checks={"decay_steps": (lambda v: v >= 1, ">= 1 update"), "decay_rate": (lambda v: v > 0, "> 0")}))
SCHEDULES.register("warmup_cosine", ScheduleEntry(
    create=_warmup_cosine, run_length=True,
    # warmup_epochs: linear from 0 to learning_rate (epochs, a float); then cosine down to
    # final_lr_fraction * learning_rate at the run's last update
    keys={**_WARMUP[0], "final_lr_fraction": 0.0},
    checks={**_WARMUP[1], "final_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]")}))
SCHEDULES.register("one_cycle", ScheduleEntry(
    create=_one_cycle, run_length=True,
    # cosine from learning_rate / div_factor up to learning_rate over warmup_epochs (> 0), then down to
    # learning_rate / (div_factor * final_div_factor) at the run's last update (PyTorch's OneCycleLR)
    keys={**_WARMUP[0], "div_factor": 25.0, "final_div_factor": 1e4},
    checks={**_WARMUP[1], "div_factor": (lambda v: v >= 1, ">= 1"),
            "final_div_factor": (lambda v: v >= 1, ">= 1")}))


def create_schedule(optimizer_config: Any, *, steps_per_epoch: int,
                    num_epochs: int) -> Callable[[jax.Array], jax.Array]:
    """The learning-rate schedule of a config's ``optimizer`` section: ``schedule(step) -> float32[]``.

    Args:
      optimizer_config: the ``optimizer`` section.
      steps_per_epoch: the run's updates per epoch (``TrainPipeline.steps_per_epoch``: ceil(resampled
        training rows / train.batch_size); :func:`imgclf_jax.data.pipeline.steps_per_epoch`).
      num_epochs: ``train.num_epochs``.

    Raises:
      ConfigError: ``optimizer.schedule`` is not in :data:`SCHEDULES` (the message lists the names),
        or its settings do not fit the run (e.g. a warmup as long as the run).
    """
    return SCHEDULES[optimizer_config.schedule].create(optimizer_config, steps_per_epoch, num_epochs)


def create_optimizer(optimizer_config: Any, *, steps_per_epoch: int,
                     num_epochs: int) -> tuple[optax.GradientTransformation, Callable]:
    """Builds the optimizer and its learning-rate schedule from a config's ``optimizer`` section.

    ``name`` picks an :data:`OPTIMIZERS` entry ('keras_adam': :func:`keras_adam`;
    'adam': ``optax.adam`` with ``eps_root=0``; 'adamw': ``optax.adamw`` with
    ``weight_decay`` on the kernels; 'sgd': :func:`sgdw`), ``schedule`` a :data:`SCHEDULES`
    entry ('constant', 'exponential_decay': :func:`exponential_decay`, 'warmup_cosine':
    :func:`warmup_cosine`, 'one_cycle': :func:`one_cycle`). Every optimizer evaluates the
    schedule at the number of updates so far.

    Args:
      optimizer_config: the ``optimizer`` section.
      steps_per_epoch, num_epochs: the run's, as in :func:`create_schedule` (the epoch-based
        schedules convert ``optimizer.warmup_epochs`` and find the last update with them).

    Returns:
      (the ``optax.GradientTransformation``, ``schedule(step) -> float32[]`` for logging).

    Raises:
      ConfigError: an unknown ``name`` or ``schedule`` (the message lists the names), or a
        schedule whose settings do not fit the run.
    """
    o = optimizer_config
    entry = OPTIMIZERS[o.name]
    schedule_entry = SCHEDULES[o.schedule]
    schedule = schedule_entry.create(o, steps_per_epoch, num_epochs)
    lr: ScalarOrSchedule = schedule
    if schedule_entry.constant:  # a Python float as before; a member's array value as it is
        lr = float(o.learning_rate) if isinstance(o.learning_rate, (int, float)) else o.learning_rate
    return entry.create(o, lr), schedule


# Updates per epoch that tools without the data (summary's memory figures, the benchmarks) build
# the optimizer with: the optimizer state's shapes and the step's work do not depend on it.
NOMINAL_STEPS_PER_EPOCH = 1000


def create_optimizer_for_shapes(optimizer_config: Any, num_epochs: int) -> optax.GradientTransformation:
    """The run's optimizer, for its state's shapes and its step's cost only (no data at hand).

    Built with :data:`NOMINAL_STEPS_PER_EPOCH` updates per epoch: the state and the work per update
    are the run's, the learning rates are not (do not read them).

    Raises:
      ConfigError: as :func:`create_optimizer`.
    """
    tx, _ = create_optimizer(optimizer_config, steps_per_epoch=NOMINAL_STEPS_PER_EPOCH, num_epochs=num_epochs)
    return tx

