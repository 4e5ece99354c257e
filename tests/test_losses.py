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
