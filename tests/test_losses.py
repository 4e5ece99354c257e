"""Tests of imgclf_jax.losses: the masked cross-entropy (moved from optim), soft targets, the table."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgclf_jax import losses
from imgclf_jax.errors import ConfigError
from imgclf_jax.losses import softmax_cross_entropy


def test_masked_cross_entropy_hand_value():
    logits = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [jnp.inf, jnp.nan, 0.0]])
    labels = jnp.array([0, 2, 7])  # the padded row's label is out of range on purpose
    mask = jnp.array([True, True, False])
    # row 0: -log(1/3) = log 3 = 1.0986122886681098
    # row 1: -log(e^3 / (e + e^2 + e^3)) = log(1 + e^-1 + e^-2) = 0.4076059644443804
    # mean over the 2 real rows: 0.7531091265562451
    loss = softmax_cross_entropy(logits, labels, mask)
    assert float(loss) == pytest.approx(0.7531091265562451, rel=1e-6)
    grads = jax.grad(lambda x: softmax_cross_entropy(x, labels, mask))(logits)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads[2]) == 0.0)


def test_masked_cross_entropy_all_padding_is_zero():
    loss = softmax_cross_entropy(jnp.ones((2, 3)), jnp.array([0, 1]), jnp.array([False, False]))
    assert float(loss) == 0.0


def test_soft_targets_hand_value_and_padding_ignored():
    logits = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [jnp.nan, 1.0, 0.0]])
    targets = jnp.array([[0.5, 0.5, 0.0], [0.25, 0.0, 0.75], [jnp.nan, 0.0, 1.0]])
    mask = jnp.array([True, True, False])
    # row 0: log 3 = 1.0986122886681098 (any targets: uniform logits)
    # row 1: logsumexp = 3 + log(1 + e^-1 + e^-2) = 3.4076059644443804;
    #        0.25 * (3.4076 - 1) + 0.75 * (3.4076 - 3) = 0.9076059644443804
    # mean: 1.0031091265562451
    loss = losses.soft_softmax_cross_entropy(logits, targets, mask)
    assert float(loss) == pytest.approx(1.0031091265562451, rel=1e-6)
    grads = jax.grad(lambda x: losses.soft_softmax_cross_entropy(x, targets, mask))(logits)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads[2]) == 0.0)


def test_the_table_entry_reads_targets_when_present_else_labels():
    entry = losses.LOSSES["softmax_cross_entropy"]
    assert entry.soft_targets and losses.DEFAULT == "softmax_cross_entropy"
    logits = jnp.array([[0.3, -1.0, 2.0], [1.0, 2.0, 3.0]])
    batch = {"label": jnp.array([2, 0]), "mask": jnp.array([True, True])}
    np.testing.assert_array_equal(entry.fn(logits, batch), softmax_cross_entropy(logits, batch["label"], batch["mask"]))
    one_hot = dict(batch, targets=jax.nn.one_hot(batch["label"], 3))
    np.testing.assert_allclose(entry.fn(logits, one_hot), entry.fn(logits, batch), rtol=1e-6)
    uniform = dict(batch, targets=jnp.full((2, 3), 1 / 3))
    expected = float(np.mean(-np.mean(np.asarray(jax.nn.log_softmax(logits)), axis=1)))
    assert float(entry.fn(logits, uniform)) == pytest.approx(expected, rel=1e-6)


def test_an_unknown_loss_is_a_one_line_error():
    with pytest.raises(ConfigError) as info:
        losses.LOSSES.get("hinge")
    assert str(info.value) == "config key 'loss.name' must be one of ('softmax_cross_entropy',), got 'hinge'"


# ----------------------------------------------------------------- label smoothing (loss.label_smoothing)


def test_label_smoothing_hand_value_for_labels_and_soft_targets():
    logits = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [jnp.inf, jnp.nan, 0.0]])
    labels, mask = jnp.array([0, 2, 7]), jnp.array([True, True, False])
    # eps 0.1, C 3: targets (1 - eps) t + eps / 3. Row 0 (uniform logits): log 3 = 1.0986122886681098
    # whatever the targets. Row 1: lse = 3.4076059644443804, so the loss is
    # 0.9 * (lse - 3) + 0.1 * mean_c (lse - z_c) = 0.9 * 0.40760596 + 0.1 * 1.40760596 = 0.5076059644443806;
    # mean over the 2 real rows: 0.8031091265562451.
    loss = softmax_cross_entropy(logits, labels, mask, label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.8031091265562451, rel=1e-6)
    # The same through the table entry as the step gets it (bound by recipe_hooks).
    entry = losses.LOSSES["softmax_cross_entropy"]
    assert entry.keys == {"label_smoothing": 0.0}
    batch = {"label": labels, "mask": mask}
    assert float(entry.fn(logits, batch, label_smoothing=0.1)) == pytest.approx(0.8031091265562451, rel=1e-6)
    # Soft targets (row 1: 0.25, 0, 0.75) are smoothed alike: (0.2583, 0.0333, 0.7083), so row 1 is
    # 0.25833 * 2.40761 + 0.03333 * 1.40761 + 0.70833 * 0.40761 = 0.9576059644443806; mean 1.0281091265562452.
    targets = jnp.array([[0.5, 0.5, 0.0], [0.25, 0.0, 0.75], [jnp.nan, 0.0, 1.0]])
    soft = entry.fn(logits, dict(batch, targets=targets), label_smoothing=0.1)
    assert float(soft) == pytest.approx(1.0281091265562452, rel=1e-6)
    grads = jax.grad(lambda x: entry.fn(x, dict(batch, targets=targets), label_smoothing=0.1))(logits)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads[2]) == 0.0)  # padding: no gradient


def test_label_smoothing_zero_is_todays_arithmetic_bit_for_bit():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(7, 5)).astype(np.float32) * 4)
    labels, mask = jnp.asarray(rng.integers(0, 5, 7)), jnp.arange(7) < 6
    targets = jax.nn.softmax(jnp.asarray(rng.normal(size=(7, 5)).astype(np.float32)))

    def before(x):  # softmax_cross_entropy as it was before the key existed
        m = jnp.asarray(mask, bool)
        z = jnp.where(m[:, None], x.astype(jnp.float32), 0.0)
        per_row = optax.softmax_cross_entropy_with_integer_labels(z, jnp.where(m, labels, 0))
        return jnp.sum(jnp.where(m, per_row, 0.0)) / jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)

    entry = losses.LOSSES["softmax_cross_entropy"].fn
    batch = {"label": labels, "mask": mask}
    for fn in (jax.jit(before), jax.jit(lambda x: entry(x, batch, label_smoothing=0.0))):
        np.testing.assert_array_equal(fn(logits), jax.jit(before)(logits))
    np.testing.assert_array_equal(jax.grad(lambda x: entry(x, batch, label_smoothing=0.0))(logits),
                                  jax.grad(before)(logits))
    np.testing.assert_array_equal(losses.soft_softmax_cross_entropy(logits, targets, mask, 0.0),
                                  losses.soft_softmax_cross_entropy(logits, targets, mask))
    assert float(entry(logits, batch, label_smoothing=0.2)) != float(before(logits))  # on: it changes
