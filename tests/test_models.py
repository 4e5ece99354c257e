"""Tests of imgclf_jax.models: Keras-equal parameter counts, shapes, init, dropout, L2, FLOPs.

The expected parameter counts are worked out by hand from the layer lists of
../shared/seed-attempts.md (128x128x3 input, 5 classes); conv params are
k*k*C_in*C_out + C_out, dense params N_in*N_out + N_out.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgclf_jax import config as config_lib
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import BranchedCNN, create_model, l2_penalty, layer_specs
from imgclf_jax.summary import count_flops

# ml1: valid convs, each followed by a 2x2 max pool.
#   conv_0  3*3*3*32 + 32    =       896   128 -> 126 -> pool 63
#   conv_1  3*3*32*64 + 64   =    18,496    63 ->  61 -> pool 30
#   conv_2  3*3*64*128 + 128 =    73,856    30 ->  28 -> pool 14
#   flatten 14*14*128        =    25,088 features
#   dense_0 25088*256 + 256  = 6,422,784
#   logits  256*5 + 5        =     1,285
#   total                    = 6,517,317
ML1 = (3*3*3*32 + 32) + (3*3*32*64 + 64) + (3*3*64*128 + 128) + (25088*256 + 256) + (256*5 + 5)

# ml2: same convs, each followed by a max pool.
#   conv_0  3*3*3*32 + 32    =       896   128 -> pool 64
#   conv_1  5*5*32*64 + 64   =    51,264    64 -> pool 32
#   conv_2  3*3*64*128 + 128 =    73,856    32 -> pool 16
#   flatten 16*16*128        =    32,768 features
#   dense_0 32768*128 + 128  = 4,194,432
#   dense_1 128*64 + 64      =     8,256
#   logits  64*5 + 5         =       325
#   total                    = 4,329,029
ML2 = (3*3*3*32 + 32) + (5*5*32*64 + 64) + (3*3*64*128 + 128) + (32768*128 + 128) + (128*64 + 64) + (64*5 + 5)

# ml4: same convs; pools after conv_1 and conv_2 only; side branch.
#   conv_0    3*3*3*32 + 32     =        896   128 (no pool)
#   conv_1    3*3*32*64 + 64    =     18,496   128 -> pool 64
#   conv_2    3*3*64*128 + 128  =     73,856    64 -> pool 32
#   flatten   32*32*128         =    131,072 features
#   side_conv 3*3*3*16 + 16     =        448   128 -> avgpool 16 -> 8x8x16 = 1,024 features
#   concat    131072 + 1024     =    132,096 features
#   dense_0   132096*256 + 256  = 33,816,832
#   dense_1   256*128 + 128     =     32,896
#   logits    128*5 + 5         =        645
#   total                       = 33,944,069
ML4 = ((3*3*3*32 + 32) + (3*3*32*64 + 64) + (3*3*64*128 + 128) + (3*3*3*16 + 16)
       + (132096*256 + 256) + (256*128 + 128) + (128*5 + 5))

# ml5: as ml4, wider.
#   conv_0    3*3*3*48 + 48     =      1,344   128 (no pool)
#   conv_1    3*3*48*96 + 96    =     41,568   128 -> pool 64
#   conv_2    3*3*96*192 + 192  =    166,080    64 -> pool 32
#   flatten   32*32*192         =    196,608 features
#   side_conv 3*3*3*32 + 32     =        896   -> 8x8x32 = 2,048 features
#   concat    196608 + 2048     =    198,656 features
#   dense_0   198656*420 + 420  = 83,435,940
#   dense_1   420*256 + 256     =    107,776
#   dense_2   256*64 + 64       =     16,448
#   logits    64*5 + 5          =        325
#   total                       = 83,770,377
ML5 = ((3*3*3*48 + 48) + (3*3*48*96 + 96) + (3*3*96*192 + 192) + (3*3*3*32 + 32)
       + (198656*420 + 420) + (420*256 + 256) + (256*64 + 64) + (64*5 + 5))

# ml6: 5x5 second conv and 5x5 side conv.
#   conv_0    3*3*3*32 + 32     =        896   128 (no pool)
#   conv_1    5*5*32*70 + 70    =     56,070   128 -> pool 64
#   conv_2    3*3*70*160 + 160  =    100,960    64 -> pool 32
#   flatten   32*32*160         =    163,840 features
#   side_conv 5*5*3*48 + 48     =      3,648   -> 8x8x48 = 3,072 features
#   concat    163840 + 3072     =    166,912 features
#   dense_0   166912*420 + 420  = 70,103,460
#   dense_1   420*256 + 256     =    107,776
#   dense_2   256*64 + 64       =     16,448
#   logits    64*5 + 5          =        325
#   total                       = 70,389,583
ML6 = ((3*3*3*32 + 32) + (5*5*32*70 + 70) + (3*3*70*160 + 160) + (5*5*3*48 + 48)
       + (166912*420 + 420) + (420*256 + 256) + (256*64 + 64) + (64*5 + 5))

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")

HAND_COUNTS = {"ml1": (ML1, 6_517_317), "ml2": (ML2, 4_329_029), "ml4": (ML4, 33_944_069),
               "ml5": (ML5, 83_770_377), "ml6": (ML6, 70_389_583)}


def load(name: str) -> ml_collections.ConfigDict:
    return config_lib.load_config_file(os.path.join(CONFIGS, f"{name}.py"))


def abstract_variables(model: BranchedCNN, size: int, batch: int = 1):
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def tiny_config(**changes) -> ml_collections.ConfigDict:
    """A small model on 8x8 images (main conv 4 3x3 valid + pool, side 2 3x3 + avgpool 4, dense 10)."""
    m = config_lib.base_config().model
    m.conv_filters = (4,)
    m.conv_kernel_sizes = (3,)
    m.conv_paddings = ("valid",)
    m.conv_pools = (True,)
    m.conv_dropouts = (0.5,)
    m.side_filters = 2
    m.side_kernel_size = 3
    m.side_pool_size = 4
    m.dense_units = (10,)
    m.dense_dropouts = (0.5,)
    for key, value in changes.items():
        m[key] = value
    return m


@pytest.fixture(scope="module")
def ml1_variables():
    model = create_model(load("ml1").model, 5)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=False)


# --------------------------------------------------------------------------- counts and shapes


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_param_count_equals_hand_count(name):
    by_expression, by_hand = HAND_COUNTS[name]
    assert by_expression == by_hand
    model = create_model(load(name).model, 5)
    assert count(abstract_variables(model, 128)["params"]) == by_hand


@pytest.mark.parametrize("name", ["ml1", "ml2", "ml4", "ml5", "ml6", "digits"])
def test_layer_specs_match_module(name):
    config = load(name)
    size = config.data.image_size
    model = create_model(config.model, 5)
    real = {k: count(v) for k, v in abstract_variables(model, size)["params"].items()}
    analytic = {r.name: r.params for r in layer_specs(config.model, size, 5) if r.params}
    assert real == analytic


@pytest.mark.parametrize("name", ["ml4", "ml5", "ml6"])
def test_output_shape_abstract(name):
    model = create_model(load(name).model, 5)
    images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)

    def forward(key, x):
        return model.apply(model.init(key, x, train=False), x, train=False)

    out = jax.eval_shape(forward, jax.random.key(0), images)
    assert out.shape == (2, 5) and out.dtype == jnp.float32


def test_output_shape_real(ml1_variables):
    model, variables = ml1_variables
    images = jax.random.uniform(jax.random.key(1), (2, 128, 128, 3))
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_layer_names_are_stable():
    params = abstract_variables(create_model(load("ml6").model, 5), 128)["params"]
    assert sorted(params) == ["conv_0", "conv_1", "conv_2", "dense_0", "dense_1", "dense_2",
                              "logits", "side_conv"]
    assert params["conv_1"]["kernel"].shape == (5, 5, 32, 70)  # HWIO
    assert params["side_conv"]["kernel"].shape == (5, 5, 3, 48)
    assert params["dense_0"]["kernel"].shape == (166912, 420)


def test_image_too_small_is_config_error():
    m = tiny_config(conv_kernel_sizes=(9,))
    with pytest.raises(ConfigError, match="conv_0"):
        layer_specs(m, 8, 3)


# --------------------------------------------------------------------------- Keras semantics


def test_glorot_uniform_with_receptive_field_and_zero_biases(ml1_variables):
    _, variables = ml1_variables
    for name, layer in variables["params"].items():
        kernel = np.asarray(layer["kernel"])
        receptive = math.prod(kernel.shape[:-2])  # k*k for HWIO conv kernels, 1 for dense
        fan_in, fan_out = receptive * kernel.shape[-2], receptive * kernel.shape[-1]
        limit = math.sqrt(6.0 / (fan_in + fan_out))  # Keras glorot_uniform
        assert np.abs(kernel).max() <= limit * (1 + 1e-6), name  # float32 rounding of the limit
        assert np.abs(kernel).max() > 0.95 * limit, name  # and not a narrower init
        assert kernel.std() == pytest.approx(limit / math.sqrt(3.0), rel=0.08), name
        assert abs(kernel.mean()) < 0.1 * limit, name
        assert np.all(np.asarray(layer["bias"]) == 0.0), name


def test_flatten_is_row_major_hwc_and_side_branch_is_concatenated_last():
    # 1x1 conv copying input channels 0, 1 to its 2 filters, on a 2x2 image, no pool;
    # side branch: 1x1 conv copying channel 2, average-pooled 2x2 -> 1 feature.
    model = BranchedCNN(num_classes=1, conv_filters=(2,), conv_kernel_sizes=(1,),
                        conv_paddings=("VALID",), conv_pools=(False,), conv_dropouts=(0.0,),
                        side_filters=1, side_kernel_size=1, side_pool_size=2,
                        dense_units=(), dense_dropouts=())
    images = jax.random.uniform(jax.random.key(0), (1, 2, 2, 3))
    variables = model.init(jax.random.key(1), images, train=False)
    params = jax.tree.map(jnp.zeros_like, variables["params"])
    params["conv_0"]["kernel"] = jnp.eye(3, 2).reshape(1, 1, 3, 2)
    params["side_conv"]["kernel"] = jnp.array([0.0, 0.0, 1.0]).reshape(1, 1, 3, 1)
    x = np.asarray(images[0])
    expected = [x[h, w, c] for h in range(2) for w in range(2) for c in range(2)]  # Keras order
    expected.append(x[:, :, 2].mean())
    assert len(expected) == 9
    for j, value in enumerate(expected):
        params["logits"]["kernel"] = jnp.zeros((9, 1)).at[j, 0].set(1.0)
        out = model.apply({"params": params}, images, train=False)
        assert float(out[0, 0]) == pytest.approx(float(value), rel=1e-6), j


def test_same_and_valid_padding_and_pool_sizes():
    # 'same' keeps 7 -> 7, 'valid' 3x3 gives 7 -> 5, the pool floors 5 -> 2.
    m = tiny_config(conv_filters=(3, 5), conv_kernel_sizes=(3, 3), conv_paddings=("same", "valid"),
                    conv_pools=(False, True), conv_dropouts=(0.0, 0.0), side_filters=0)
    shapes = {r.name: r.output_shape for r in layer_specs(m, 7, 3)}
    assert shapes["conv_0"] == (7, 7, 3) and shapes["conv_1"] == (5, 5, 5)
    assert shapes["pool_1"] == (2, 2, 5) and shapes["flatten"] == (20,)
    params = abstract_variables(create_model(m, 3), 7)["params"]
    assert params["dense_0"]["kernel"].shape == (20, 10)


def test_dropout_only_in_training():
    model = create_model(tiny_config(), 3)
    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), images, train=False)
    a = model.apply(variables, images, train=False)
    b = model.apply(variables, images, train=False, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(a, b)
    c = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})
    d = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(3)})
    e = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(c, d)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(c, e)  # same key, same mask


def test_zero_dropout_rates_add_no_layers():
    m = tiny_config(conv_dropouts=(0.0,), dense_dropouts=(0.0,))
    model = create_model(m, 3)
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), images, train=False)
    # No 'dropout' rng needed even in training: there is no dropout layer.
    out = model.apply(variables, images, train=True)
    np.testing.assert_array_equal(out, model.apply(variables, images, train=False))
    assert all(r.kind != "dropout" for r in layer_specs(m, 8, 3))


# --------------------------------------------------------------------------- L2 and FLOPs


def test_l2_penalty_hand_value():
    model = create_model(tiny_config(), 3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    params = variables["params"]
    # Constant kernels: sum(w**2) = value**2 * size.
    fill = {"conv_0": 0.5, "side_conv": -1.0, "dense_0": 0.1, "logits": 100.0}
    params = {name: {"kernel": jnp.full_like(layer["kernel"], fill[name]),
                     "bias": jnp.full_like(layer["bias"], 7.0)}  # biases are never regularized
              for name, layer in params.items()}
    # conv_0    kernel 3*3*3*4 = 108 weights of 0.5  -> 108 * 0.25 = 27.0
    # side_conv kernel 3*3*3*2 =  54 weights of -1.0 ->  54 * 1.0  = 54.0
    # dense_0   kernel (3*3*4 + 2*2*2) * 10 = 44 * 10 = 440 weights of 0.1 -> 440 * 0.01 = 4.4
    # logits    excluded (the output layer); biases excluded
    # l2 = 1e-3: 1e-3 * (27 + 54 + 4.4) = 0.0854
    assert float(l2_penalty(params, 1e-3)) == pytest.approx(0.0854, rel=1e-6)
    assert float(l2_penalty({"params": params}, 1e-3)) == pytest.approx(0.0854, rel=1e-6)
    assert float(l2_penalty(params, 0.0)) == 0.0
    grads = jax.grad(lambda p: l2_penalty(p, 1e-3))(params)
    np.testing.assert_allclose(grads["conv_0"]["kernel"], 2e-3 * 0.5, rtol=1e-6)
    assert float(jnp.abs(grads["logits"]["kernel"]).max()) == 0.0


def test_flops_tiny_model_hand_count():
    m = tiny_config()
    # 8x8x3 input, 3 classes; multiply-adds:
    #   conv_0    3x3 valid, 4 filters: 6*6 outputs * 3*3*3 * 4 = 36 * 27 * 4 = 3,888 (then pool 3x3x4 = 36)
    #   side_conv 3x3 same, 2 filters:  8*8 outputs * 3*3*3 * 2 = 64 * 27 * 2 = 3,456 (avgpool 4 -> 2x2x2 = 8)
    #   dense_0   (36 + 8) * 10 = 440
    #   logits    10 * 3 = 30
    #   total 7,814 multiply-adds -> 15,628 FLOPs
    assert count_flops(m, 8, 3) == 2 * (3888 + 3456 + 440 + 30) == 15_628
    # Params by hand: conv_0 108 + 4, side_conv 54 + 2, dense_0 440 + 10, logits 30 + 3.
    model = create_model(m, 3)
    assert count(abstract_variables(model, 8)["params"]) == 112 + 56 + 450 + 33


def test_flops_ml1_first_conv():
    # conv_0 of ml1: 126*126 outputs * 3*3*3 * 32 multiply-adds.
    rows = layer_specs(load("ml1").model, 128, 5)
    assert rows[0].name == "conv_0" and rows[0].macs == 126 * 126 * 27 * 32
