"""Tests of imgclf_jax.optim: Keras's Adam, Keras's ExponentialDecay (the loss: tests/test_losses.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgclf_jax import config as config_lib
from imgclf_jax.optim import (
    create_optimizer,
    exponential_decay,
    keras_adam,
)

B1, B2, EPS = 0.9, 0.999, 1e-7


def keras_adam_by_hand(params, grads, lrs):
    """Keras's Adam formula in float64, one update per gradient; returns the params after each."""
    p = np.array(params, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for step, (g, lr) in enumerate(zip(grads, lrs)):
        t = step + 1
        g = np.array(g, np.float64)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        lr_t = lr * math.sqrt(1 - B2**t) / (1 - B1**t)
        p = p - lr_t * m / (np.sqrt(v) + EPS)
        out.append(p.copy())
    return out


def run(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params))
    return out, state


# Element 0 an ordinary gradient; element 1 tiny (1e-8), where epsilon dominates. Params start
# at 0 so float32 resolves even the tiny element's ~3e-6 moves to full precision.
PARAMS = jnp.array([0.0, 0.0], jnp.float32)
GRADS = [[0.5, 1e-8], [-0.3, 1e-8], [0.1, 1e-8]]


def test_keras_adam_matches_hand_values_for_three_steps():
    lr = 1e-3
    ours, state = run(keras_adam(lr), PARAMS, GRADS)
    hand = keras_adam_by_hand(PARAMS, GRADS, [lr] * 3)
    for step in range(3):
        np.testing.assert_allclose(ours[step], hand[step], rtol=1e-5)
    assert int(state.count) == 3
    # Step 1 written out: m = 0.1 g, v = 0.001 g^2, lr_t = lr * sqrt(0.001) / 0.1, so the move is
    # -lr * sqrt(0.001) g / (sqrt(0.001) |g| + eps).
    assert hand[0][0] == pytest.approx(-lr * math.sqrt(0.001) * 0.5 / (math.sqrt(0.001) * 0.5 + EPS), rel=1e-12)
    tiny_move = -lr * math.sqrt(0.001) * 1e-8 / (math.sqrt(0.001) * 1e-8 + EPS)
    assert hand[0][1] == pytest.approx(tiny_move, rel=1e-12)
    assert tiny_move == pytest.approx(-3.1523e-6, rel=1e-3)
    assert ours[0][1] == pytest.approx(-3.1523e-6, rel=1e-3)


def test_keras_adam_differs_from_optax_adam_only_for_tiny_gradients():
    params = PARAMS
    ours, _ = run(keras_adam(1e-3), params, GRADS)
    theirs, _ = run(optax.adam(1e-3, b1=B1, b2=B2, eps=EPS), params, GRADS)
    # Ordinary gradient: equal to ~1e-5 relative.
    np.testing.assert_allclose(ours[2][0], theirs[2][0], rtol=1e-4)
    # Tiny gradient: optax moves ~ -lr * g / (g + eps) = -9.1e-5 on step 1, Keras ~ -3.2e-6.
    assert theirs[0][1] == pytest.approx(-1e-3 * 1e-8 / (1e-8 + EPS), rel=1e-4)
    assert abs(theirs[0][1]) > 20 * abs(ours[0][1])
    hand = keras_adam_by_hand(params, GRADS, [1e-3] * 3)
    np.testing.assert_allclose([o[1] for o in ours], [h[1] for h in hand], rtol=1e-5)


def test_keras_adam_schedule_sees_updates_so_far():
    schedule = exponential_decay(1e-3, 1, 0.5)  # lr(step) = 1e-3 * 0.5**step
    params = PARAMS
    ours, _ = run(keras_adam(schedule), params, GRADS)
    hand = keras_adam_by_hand(params, GRADS, [1e-3, 5e-4, 2.5e-4])  # lr(0), lr(1), lr(2)
    for step in range(3):
        np.testing.assert_allclose(ours[step], hand[step], rtol=1e-5)


def test_keras_adam_state_dtypes():
    params = {"w": jnp.ones((2, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    tx = keras_adam(1e-3)
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
    assert jax.tree.map(lambda u: u.dtype, updates) == {"w": jnp.float32, "b": jnp.float32}


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("initial, decay_steps, rate, staircase, expected", [
    # attempt 4: 1e-4 * 1.5 ** (step / 10000), growing
    (1e-4, 10000, 1.5, False, {0: 1e-4, 5000: 1.224744871391589e-4, 10000: 1.5e-4, 20000: 2.25e-4}),
    (1e-4, 10000, 1.5, True, {0: 1e-4, 5000: 1e-4, 10000: 1.5e-4, 20000: 2.25e-4, 25000: 2.25e-4}),
    # attempt 6: 5e-4 * 0.95 ** (step / 1000)
    (5e-4, 1000, 0.95, False, {0: 5e-4, 1500: 4.629727313784258e-4, 5000: 3.868904687499999e-4,
                               10000: 2.9936846961918935e-4, 20000: 1.7924296120427094e-4}),
    (5e-4, 1000, 0.95, True, {0: 5e-4, 1500: 4.75e-4, 5000: 3.868904687499999e-4,
                              10000: 2.9936846961918935e-4, 20000: 1.7924296120427094e-4}),
])
def test_exponential_decay_hand_values(initial, decay_steps, rate, staircase, expected):
    schedule = exponential_decay(initial, decay_steps, rate, staircase)
    for step, value in expected.items():
        got = schedule(jnp.int32(step))
        assert got.dtype == jnp.float32
        assert float(got) == pytest.approx(value, rel=1e-6), step


@pytest.mark.parametrize("staircase", [False, True])
@pytest.mark.parametrize("initial, decay_steps, rate", [(1e-4, 10000, 1.5), (5e-4, 1000, 0.95)])
def test_exponential_decay_equals_optax(initial, decay_steps, rate, staircase):
    ours = exponential_decay(initial, decay_steps, rate, staircase)
    theirs = optax.exponential_decay(initial, decay_steps, rate, staircase=staircase)
    steps = jnp.arange(0, 40000, 37, dtype=jnp.int32)
    np.testing.assert_allclose(jax.vmap(ours)(steps), jax.vmap(theirs)(steps), rtol=1e-6)


def test_create_optimizer_from_configs():
    c = config_lib.base_config().optimizer
    tx, schedule = create_optimizer(c)
    assert float(schedule(jnp.int32(12345))) == pytest.approx(1e-3)
    c.schedule, c.learning_rate, c.decay_steps, c.decay_rate = "exponential_decay", 1e-4, 10000, 1.7
    tx, schedule = create_optimizer(c)
    assert float(schedule(jnp.int32(10000))) == pytest.approx(1.7e-4, rel=1e-6)
    params = jnp.zeros((2,), jnp.float32)
    ours, state = run(tx, params, GRADS)
    lrs = [1e-4 * 1.7 ** (s / 10000) for s in range(3)]
    hand = keras_adam_by_hand(params, GRADS, lrs)
    np.testing.assert_allclose(ours[2], hand[2], rtol=1e-5)
    for name in ("adam", "adamw"):
        c.name, c.weight_decay = name, 0.01
        tx, _ = create_optimizer(c)
        updates, _ = tx.update(jnp.ones((2,)), tx.init(params), params)
        assert updates.shape == (2,) and np.all(np.isfinite(updates))
