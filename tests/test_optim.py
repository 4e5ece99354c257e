"""Tests of imgclf_jax.optim: Keras's Adam, SGDW, the schedules (the loss: tests/test_losses.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgclf_jax import config as config_lib, optim
from imgclf_jax.errors import ConfigError
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
    tx, schedule = create_optimizer(c, steps_per_epoch=10, num_epochs=3)
    assert float(schedule(jnp.int32(12345))) == pytest.approx(1e-3)
    c.schedule, c.learning_rate, c.decay_steps, c.decay_rate = "exponential_decay", 1e-4, 10000, 1.7
    tx, schedule = create_optimizer(c, steps_per_epoch=10, num_epochs=3)  # counted in updates: no epochs
    assert float(schedule(jnp.int32(10000))) == pytest.approx(1.7e-4, rel=1e-6)
    params = jnp.zeros((2,), jnp.float32)
    ours, state = run(tx, params, GRADS)
    lrs = [1e-4 * 1.7 ** (s / 10000) for s in range(3)]
    hand = keras_adam_by_hand(params, GRADS, lrs)
    np.testing.assert_allclose(ours[2], hand[2], rtol=1e-5)
    for name in ("adam", "adamw"):
        c.name, c.weight_decay = name, 0.01
        tx, _ = create_optimizer(c, steps_per_epoch=10, num_epochs=3)
        updates, _ = tx.update(jnp.ones((2,)), tx.init(params), params)
        assert updates.shape == (2,) and np.all(np.isfinite(updates))


# --------------------------------------------------------------------------- SGD with decoupled weight decay


def sgdw_by_hand(params, grads, lr, momentum, nesterov, weight_decay):
    """SGDW in float64: m <- g + mu m; d = m or g + mu m; p <- p - lr (d + wd p [kernels only])."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    for g in grads:
        for k in p:
            m[k] = np.asarray(g[k], np.float64) + momentum * m[k]
            d = np.asarray(g[k], np.float64) + momentum * m[k] if nesterov else m[k]
            decay = weight_decay * p[k] if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (d + decay)
    return p


def test_sgd_nesterov_with_decoupled_weight_decay_by_hand():
    params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
    grads = [{"kernel": jnp.array([[0.1, 0.2]]), "bias": jnp.array([0.3])},
             {"kernel": jnp.array([[-0.1, 0.4]]), "bias": jnp.array([0.0])}]
    c = config_lib.base_config().optimizer
    c.name, c.learning_rate, c.momentum, c.nesterov, c.weight_decay = "sgd", 0.1, 0.9, True, 0.01
    config_lib.check_optimizer(c)
    tx, _ = create_optimizer(c, steps_per_epoch=10, num_epochs=3)
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    # Update 1: m = g, d = 1.9 g; kernel -= 0.1 (1.9 (0.1, 0.2) + 0.01 (1, -2)) = (0.02, 0.036), so the kernel is
    # (0.98, -2.036); bias -= 0.1 * 1.9 * 0.3 = 0.057 (no decay): 0.443.
    # Update 2: m = g2 + 0.9 g1 = (-0.01, 0.58); d = g2 + 0.9 m = (-0.109, 0.922); + 0.01 (0.98, -2.036)
    # = (-0.0992, 0.90164): kernel (0.98992, -2.126164). Bias: m = 0.27, d = 0.243: 0.443 - 0.0243 = 0.4187.
    np.testing.assert_allclose(p["kernel"], [[0.98992, -2.126164]], rtol=1e-6)
    np.testing.assert_allclose(p["bias"], [0.4187], rtol=1e-6)
    hand = sgdw_by_hand(params, grads, 0.1, 0.9, True, 0.01)
    np.testing.assert_allclose(p["kernel"], hand["kernel"], rtol=1e-6)
    # Decay fed through the momentum (coupled, SGD's L2) would differ: m2 would hold 0.9 * 0.01 * p0.
    coupled = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9, nesterov=True))
    s2, q = coupled.init(params), params
    for g in grads:
        u, s2 = coupled.update(g, s2, q)
        q = optax.apply_updates(q, u)
    assert not np.allclose(q["kernel"], p["kernel"], rtol=1e-6)


def test_sgd_without_decay_is_optax_sgd_and_heavy_ball_differs_from_nesterov():
    params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
    grads = [{"kernel": jnp.array([[0.1, 0.2]]), "bias": jnp.array([0.3])}] * 3
    for nesterov in (False, True):
        ours, theirs = optim.sgdw(0.1, 0.9, nesterov), optax.sgd(0.1, momentum=0.9, nesterov=nesterov)
        a, b, sa, sb = params, params, ours.init(params), theirs.init(params)
        for g in grads:
            ua, sa = ours.update(g, sa, a)
            ub, sb = theirs.update(g, sb, b)
            a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
        jax.tree.map(np.testing.assert_array_equal, a, b)
        np.testing.assert_allclose(a["bias"], sgdw_by_hand(params, grads, 0.1, 0.9, nesterov, 0.0)["bias"], rtol=1e-6)


def test_adamw_decays_kernels_only():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "scale": jnp.ones((2,))}
    c = config_lib.base_config().optimizer
    c.name, c.learning_rate, c.weight_decay = "adamw", 0.1, 0.5
    tx, _ = create_optimizer(c, steps_per_epoch=10, num_epochs=3)
    zero = jax.tree.map(jnp.zeros_like, params)  # Adam's move is 0: only the decay moves
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], np.full((2, 2), -0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_array_equal(updates["scale"], 0.0)
    assert optim.kernel_mask(params) == {"kernel": True, "bias": False, "scale": False}


# --------------------------------------------------------------------------- epoch-based schedules


def schedule_config(name, **keys):
    c = config_lib.base_config().optimizer
    c.schedule, c.learning_rate = name, 0.1
    for key, value in keys.items():
        c[key] = value
    config_lib.check_optimizer(c)
    return c


def test_warmup_cosine_hand_values():
    # 10 updates per epoch, 5 epochs: steps 0..49; warmup 0.5 epochs = 5 updates; the floor 0.1 x 0.1.
    c = schedule_config("warmup_cosine", warmup_epochs=0.5, final_lr_fraction=0.1)
    schedule = optim.create_schedule(c, steps_per_epoch=10, num_epochs=5)
    expected = {0: 0.0, 2: 0.1 * 2 / 5, 5: 0.1,
                16: 0.1 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2),  # a quarter of the 44 decay steps
                27: 0.1 * (0.1 + 0.9 * 0.5),  # half way: 0.055
                49: 0.01, 60: 0.01}  # the last update, and after it
    for step, value in expected.items():
        got = schedule(jnp.int32(step))
        assert got.dtype == jnp.float32
        assert float(got) == pytest.approx(value, rel=1e-6, abs=1e-9), step
    no_warmup = optim.create_schedule(schedule_config("warmup_cosine"), steps_per_epoch=10, num_epochs=5)
    assert float(no_warmup(jnp.int32(0))) == pytest.approx(0.1) and float(no_warmup(jnp.int32(49))) == 0.0
    assert float(no_warmup(jnp.int32(1))) == pytest.approx(0.1 * (1 + math.cos(math.pi / 49)) / 2, rel=1e-6)


def test_one_cycle_hand_values_and_optax_onecycle():
    # warmup 0.25 epochs x 10 = 2.5 updates, rounded half up: 3; last update 49.
    c = schedule_config("one_cycle", warmup_epochs=0.25)
    schedule = optim.create_schedule(c, steps_per_epoch=10, num_epochs=5)
    low, floor = 0.1 / 25, 0.1 / 25 / 1e4
    expected = {0: low, 3: 0.1, 49: floor, 70: floor,
                1: 0.1 + (low - 0.1) / 2 * (math.cos(math.pi / 3) + 1),  # a third of the rise
                26: floor + (0.1 - floor) / 2 * (math.cos(math.pi / 2) + 1)}  # half of the 46 falling steps
    for step, value in expected.items():
        got = schedule(jnp.int32(step))
        assert got.dtype == jnp.float32
        assert float(got) == pytest.approx(value, rel=1e-5), step
    # optax.cosine_onecycle_schedule over the 49 steps to the last update, its rise at int(pct * 49) = 3.
    theirs = optax.cosine_onecycle_schedule(49, 0.1, pct_start=3.5 / 49, div_factor=25.0, final_div_factor=1e4)
    steps = jnp.arange(0, 60, dtype=jnp.int32)
    np.testing.assert_allclose(jax.vmap(schedule)(steps), jax.vmap(theirs)(steps), rtol=1e-6)


@pytest.mark.parametrize("name, warmup, message", [
    ("one_cycle", 0.0, "config key 'optimizer.warmup_epochs' (0.0 epochs = 0 updates at 10 updates per epoch) "
                       "must give 1 to 48 updates for optimizer.schedule='one_cycle': the run has 50 updates "
                       "(train.num_epochs=5)"),
    ("warmup_cosine", 4.95, "config key 'optimizer.warmup_epochs' (4.95 epochs = 50 updates at 10 updates per epoch) "
                            "must give 0 to 48 updates for optimizer.schedule='warmup_cosine': the run has 50 "
                            "updates (train.num_epochs=5)"),
])
def test_a_warmup_the_run_cannot_hold_is_a_one_line_error(name, warmup, message):
    c = schedule_config(name, warmup_epochs=warmup)
    with pytest.raises(ConfigError) as info:
        create_optimizer(c, steps_per_epoch=10, num_epochs=5)
    assert str(info.value) == message


def test_schedule_keys_are_checked_and_warmup_must_be_shorter_than_the_run():
    c = config_lib.base_config()
    c.optimizer.schedule, c.optimizer.warmup_epochs, c.train.num_epochs = "warmup_cosine", 3.0, 3
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.warmup_epochs' must be < train.num_epochs \(3\) "
                                          r"for optimizer.schedule='warmup_cosine', got 3.0$"):
        config_lib.validate(c)
    c.optimizer.schedule = "constant"
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.warmup_epochs' \(3.0\) is not used by "
                                          r"optimizer.schedule='constant'"):
        config_lib.validate(c)
    c.optimizer.warmup_epochs, c.optimizer.final_lr_fraction = 0.0, 1.5
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.final_lr_fraction' must be in \[0, 1\]"):
        config_lib.validate(c)
    c.optimizer.final_lr_fraction, c.optimizer.name, c.optimizer.nesterov = 0.0, "adam", True
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.nesterov' \(True\) is not used by "
                                          r"optimizer.name='adam'"):
        config_lib.validate(c)


def test_the_existing_schedules_ignore_the_run_length():
    c = schedule_config("exponential_decay", decay_steps=1000, decay_rate=0.95)
    a = optim.create_schedule(c, steps_per_epoch=10, num_epochs=5)
    b = optim.create_schedule(c, steps_per_epoch=391, num_epochs=80)
    steps = jnp.arange(0, 5000, 7, dtype=jnp.int32)
    np.testing.assert_array_equal(jax.vmap(a)(steps), jax.vmap(b)(steps))
    np.testing.assert_array_equal(jax.vmap(a)(steps), jax.vmap(exponential_decay(0.1, 1000, 0.95))(steps))
