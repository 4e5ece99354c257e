"""The CPU fast path computes what the ops it replaces compute: values and gradients, every shape used."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax import config as config_lib
from imgclf_jax import backend
from imgclf_jax.models import create_model, fast_path


@pytest.mark.parametrize("shape", [(2, 126, 126, 3), (2, 61, 61, 5), (3, 30, 30, 4), (1, 7, 9, 2), (2, 2, 3, 1)])
def test_max_pool_values_and_gradients_equal_flax_max_pool_bit_for_bit(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    x = jnp.maximum(x, 0.0)  # after a ReLU: many tied zeros in a window
    x = x.at[0, 0, 0, 0].set(1.0).at[0, 0, 1, 0].set(1.0)  # a tie at a positive value
    reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2), padding="VALID")  # noqa: E731
    y_ref, vjp_ref = jax.vjp(reference, x)
    y, vjp = jax.vjp(fast_path.max_pool_2x2, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    g = jax.random.normal(jax.random.key(1), y.shape)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]))


def _conv_pool_shapes():
    """(config, layer, input shape at batch 1, k, C_out, padding) of every conv followed by a max pool."""
    from benchmarks.profile_step import conv_shapes

    shapes = []
    for name in ("ml1", "ml2", "ml4", "ml5", "ml6", "digits"):
        m = config_lib.load_config_file(f"configs/{name}.py")
        pooled = {f"conv_{i}" for i, pool in enumerate(m.model.conv_pools) if pool}
        shapes += [(name, s.name, (1, *s.input_hwc), s.kernel, s.out_channels, s.padding)
                   for s in conv_shapes(m.model, m.data.image_size, 5) if s.name in pooled]
    return shapes


@pytest.mark.parametrize("config,layer,shape,k,c_out,padding", _conv_pool_shapes())
def test_conv_relu_max_pool_equals_the_separate_layers_for_every_config_shape(config, layer, shape, k, c_out,
                                                                               padding):
    """Values, input and kernel gradients bit for bit; bias gradient to float rounding."""
    x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 4) / 4  # coarse values: ties in the windows
    kernel = jnp.round(jax.random.normal(jax.random.key(1), (k, k, shape[-1], c_out)) * 4) / 16
    bias = jnp.round(jax.random.normal(jax.random.key(2), (c_out,)) * 4) / 4

    def separate(x, kernel, bias):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
        return nn.max_pool(jax.nn.relu(y), (2, 2), strides=(2, 2), padding="VALID")

    fused = lambda x, kernel, bias: fast_path.conv_relu_max_pool(x, kernel, bias, padding)  # noqa: E731
    (y_ref, vjp_ref), (y, vjp) = (jax.vjp(jax.jit(f), x, kernel, bias) for f in (separate, fused))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    assert 0 < float(jnp.mean(y > 0)) < 1  # some windows cut by the ReLU, some not
    g = jax.random.normal(jax.random.key(3), y.shape)
    (gx_ref, gk_ref, gb_ref), (gx, gk, gb) = vjp_ref(g), vjp(g)
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(gx_ref))
    np.testing.assert_array_equal(np.asarray(gk), np.asarray(gk_ref))
    np.testing.assert_allclose(np.asarray(gb), np.asarray(gb_ref), rtol=1e-5, atol=1e-4)


def test_fast_path_models_initialize_the_same_params(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    c = config_lib.load_config_file("configs/ml6.py")
    images = jnp.zeros((1, 64, 64, 3))
    params = {}
    for setting in ("off", "on"):
        c.model.fast_path = setting
        params[setting] = create_model(c.model, 5).init(jax.random.key(7), images, train=False)["params"]
    assert jax.tree.structure(params["on"]) == jax.tree.structure(params["off"])
    for a, b in zip(jax.tree.leaves(params["off"]), jax.tree.leaves(params["on"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_place_decides_env_var_then_config_then_backend(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    assert backend.enabled("auto", "cpu") and not backend.enabled("auto", "gpu")
    assert backend.enabled("on", "gpu") and not backend.enabled("off", "cpu")
    monkeypatch.setenv(backend.ENV, "0")
    assert not backend.enabled("on", "cpu")
    monkeypatch.setenv(backend.ENV, "1")
    assert backend.enabled("off", "gpu")
    monkeypatch.setenv(backend.ENV, "maybe")
    with pytest.raises(ValueError, match=backend.ENV):
        backend.enabled("auto", "cpu")


@pytest.mark.parametrize("name", ["ml1", "ml6"])
def test_models_with_and_without_the_fast_path_give_the_same_loss_gradients(name, monkeypatch):
    """The whole reference model at a reduced size: same logits and parameter gradients."""
    monkeypatch.delenv(backend.ENV, raising=False)
    c = config_lib.load_config_file(f"configs/{name}.py")
    c.model.fast_path = "off"
    slow = create_model(c.model, 5)
    c.model.fast_path = "on"
    fast = create_model(c.model, 5)
    assert fast.fast_path and not slow.fast_path
    images = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))
    params = slow.init(jax.random.key(1), images, train=False)["params"]

    def loss(model, p):
        logits = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(2)})
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    (l_slow, g_slow), (l_fast, g_fast) = (jax.value_and_grad(loss, 1)(m, params) for m in (slow, fast))
    np.testing.assert_allclose(float(l_fast), float(l_slow), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_slow), jax.tree.leaves(g_fast)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("config", ["ml1", "ml2", "ml4", "ml5", "ml6", "digits"])
def test_every_reference_model_at_full_size_gives_the_same_gradients_with_the_fast_path(config, monkeypatch):
    """Every pool shape the configs use (odd sizes included): same loss and parameter gradients."""
    monkeypatch.delenv(backend.ENV, raising=False)
    c = config_lib.load_config_file(f"configs/{config}.py")
    models = {}
    for setting in ("off", "on"):
        c.model.fast_path = setting
        models[setting] = create_model(c.model, 5)
    size = c.data.image_size
    images = jax.random.uniform(jax.random.key(0), (1, size, size, 3))
    params = models["off"].init(jax.random.key(1), images, train=False)["params"]

    def loss(model, p):
        logits = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(2)})
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    grads = {s: jax.jit(jax.grad(loss, 1), static_argnums=0)(m, params) for s, m in models.items()}
    for a, b in zip(jax.tree.leaves(grads["off"]), jax.tree.leaves(grads["on"])):
        # The max pool's gradient routes identically; the side branch's average pool sums in another order.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape,size", [((2, 128, 128, 4), 16), ((1, 35, 33, 3), 16), ((2, 9, 9, 2), 3)])
def test_avg_pool_equals_flax_avg_pool_values_and_gradients(shape, size):
    x = jax.random.normal(jax.random.key(0), shape)
    reference = lambda v: nn.avg_pool(v, (size, size), strides=(size, size), padding="VALID")  # noqa: E731
    y_ref, vjp_ref = jax.vjp(reference, x)
    y, vjp = jax.vjp(lambda v: fast_path.avg_pool(v, size), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    g = jax.random.normal(jax.random.key(1), y.shape)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (32, 64, 64, 7), (1,), (4, 1, 3)])
@pytest.mark.parametrize("p", [0.9, 0.85, 0.6])
def test_bernoulli_equals_jax_random_bernoulli_bit_for_bit(shape, p):
    keys = [jax.random.key(3), jax.random.PRNGKey(7), jax.random.fold_in(jax.random.key(1), 2**31 + 5)]
    for key in keys:
        ours = jax.jit(lambda k: fast_path.bernoulli(k, p, shape))(key)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.bernoulli(key, p, shape)))
    assert 0.3 < float(jnp.mean(ours)) < 1.0 or ours.size < 100  # a mask, not a constant


def test_bernoulli_under_vmap_and_for_other_prng_implementations():
    keys = jax.random.split(jax.random.key(5), 3)  # an ensemble's member keys
    ours = jax.vmap(lambda k: fast_path.bernoulli(k, 0.9, (4, 6, 6, 2)))(keys)
    ref = jax.vmap(lambda k: jax.random.bernoulli(k, 0.9, (4, 6, 6, 2)))(keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[1]))
    rbg = jax.random.key(5, impl="rbg")  # not threefry: jax.random.bernoulli itself
    np.testing.assert_array_equal(np.asarray(fast_path.bernoulli(rbg, 0.8, (3, 5))),
                                  np.asarray(jax.random.bernoulli(rbg, 0.8, (3, 5))))


def test_threefry2x32_matches_the_random123_known_answer():
    # Known-answer vectors of Threefry-2x32-20 from Random123's kat_vectors (also in jax's tests).
    key, count = np.uint32([0x13198A2E, 0x03707344]), np.uint32([0x243F6A88, 0x85A308D3])
    out = fast_path.threefry2x32(*(jnp.asarray(v) for v in (*key, *count)))
    assert [int(v) for v in out] == [0xC4923A9C, 0x483DF7A0]
    out = fast_path.threefry2x32(*(jnp.uint32(0xFFFFFFFF) for _ in range(4)))
    assert [int(v) for v in out] == [0x1CB996FC, 0xBB002BE7]


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_fast_dropout_layer_equals_flax_dropout(rate):
    from imgclf_jax.models.cnn import FastDropout

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    rngs = {"dropout": jax.random.key(4)}
    ref = nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
    ours = FastDropout(rate).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    assert 0 < int(jnp.sum(ours == 0)) < x.size
    np.testing.assert_array_equal(np.asarray(FastDropout(rate).apply({}, x, deterministic=True)), np.asarray(x))


def test_configure_xla_adds_the_cpu_flag_once_and_respects_the_user(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.delenv(backend.ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert backend.configure_xla("auto")
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + backend.XLA_CPU_FLAG
    assert not backend.configure_xla("auto")  # already there: not twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert not backend.configure_xla("on")  # the user's own setting wins
    monkeypatch.setenv("XLA_FLAGS", "")
    assert not backend.configure_xla("off")
    monkeypatch.setenv(backend.ENV, "0")
    assert not backend.configure_xla("on") and os.environ["XLA_FLAGS"] == ""
