"""The precision policy: model.compute_dtype (float32 | bfloat16 compute, float32 params) and model.matmul_precision."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax import config as config_lib, loop
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import create_model, describe_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _model_config(name: str, **keys):
    c = config_lib.base_config()
    config_lib.apply_override(c, "model.name", name)
    if name == "branched_cnn":
        keys = {"conv_filters": "(4, 8)", "conv_kernel_sizes": "(3, 3)", "conv_paddings": "('same', 'same')",
                "conv_pools": "(True, True)", "conv_dropouts": "(0.0, 0.0)", "dense_units": "(8,)",
                "dense_dropouts": "(0.0,)", **keys}
    else:
        keys = {"stem_width": "4", "widths": "(4, 8)", "depths": "(1, 1)", "strides": "(1, 2)", **keys}
    for key, value in keys.items():
        config_lib.apply_override(c, f"model.{key}", str(value))
    config_lib.validate(c)
    return c.model


def _conv_eqns(jaxpr):
    """Every conv_general_dilated and dot_general equation in `jaxpr`, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            found.append(eqn)
        for value in eqn.params.values():
            if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
                found += _conv_eqns(value.jaxpr)
            elif hasattr(value, "eqns"):
                found += _conv_eqns(value)
    return found


@pytest.mark.parametrize("name", ["branched_cnn", "resnet"])
@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits(name, fast_path):
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    for dtype, expected in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        m = _model_config(name, compute_dtype=dtype, fast_path=fast_path)
        model = create_model(m, 5)
        variables = model.init(jax.random.key(1), images, train=False)
        assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}  # params, batch_stats
        logits = model.apply(variables, images, train=False)
        assert logits.shape == (2, 5) and logits.dtype == jnp.float32
        if name == "branched_cnn":
            assert model.fast_path == (fast_path == "auto" and dtype == "float32")  # CPU: 'auto' is on
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images).jaxpr
        eqns = _conv_eqns(jaxpr)
        assert eqns, "no conv or matmul found in the jaxpr"
        assert {v.aval.dtype for e in eqns for v in e.invars} == {jnp.dtype(expected)}


def test_bfloat16_logits_are_close_to_float32_and_gradients_are_float32():
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    f32 = create_model(_model_config("resnet"), 5)
    b16 = create_model(_model_config("resnet", compute_dtype="bfloat16"), 5)
    variables = f32.init(jax.random.key(1), images, train=False)  # the same params serve both
    a = f32.apply(variables, images, train=False)
    b = b16.apply(variables, images, train=False)
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # bfloat16 rounds: not the same numbers
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.1 * float(jnp.max(jnp.abs(a))) + 1e-3)

    def loss(params):
        return jnp.sum(b16.apply({**variables, "params": params}, images, train=False) ** 2)

    grads = jax.grad(loss)(variables["params"])
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ["branched_cnn", "resnet"])
def test_matmul_precision_highest_reaches_every_conv_and_matmul(name):
    images = jnp.ones((1, 16, 16, 3))
    for setting, expected in (("default", None), ("highest", jax.lax.Precision.HIGHEST)):
        model = create_model(_model_config(name, matmul_precision=setting, fast_path="off"), 3)
        variables = model.init(jax.random.key(0), images, train=False)
        eqns = _conv_eqns(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images).jaxpr)
        precisions = {e.params["precision"] for e in eqns}
        if expected is None:
            assert precisions <= {None, (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)}
        else:
            assert precisions == {(expected, expected)}


def test_the_defaults_are_float32_and_a_section_without_the_keys_is_the_same_model():
    m = _model_config("branched_cnn")
    assert (m.compute_dtype, m.matmul_precision) == ("float32", "default")
    assert "compute" not in describe_model(m)
    old = {k: v for k, v in m.to_dict().items() if k not in ("compute_dtype", "matmul_precision")}
    import ml_collections

    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    new_model, old_model = create_model(m, 3), create_model(ml_collections.ConfigDict(old), 3)
    variables = new_model.init(jax.random.key(1), images, train=False)
    np.testing.assert_array_equal(np.asarray(new_model.apply(variables, images, train=False)),
                                  np.asarray(old_model.apply(variables, images, train=False)))
    assert "compute bfloat16 (params float32)" in describe_model(_model_config("resnet", compute_dtype="bfloat16"))


def test_bad_settings_are_refused_in_one_line():
    c = config_lib.base_config()
    config_lib.apply_override(c, "model.compute_dtype", "float16")
    with pytest.raises(ConfigError, match=r"^config key 'model.compute_dtype' must be one of \('float32', "
                                          r"'bfloat16'\), got 'float16'$"):
        config_lib.validate(c)
    c = config_lib.base_config()
    config_lib.apply_override(c, "model.matmul_precision", "tf32")
    with pytest.raises(ConfigError, match="config key 'model.matmul_precision' must be one of"):
        config_lib.validate(c)
    c = config_lib.base_config()
    config_lib.apply_override(c, "model.compute_dtype", "bfloat16")
    config_lib.apply_override(c, "model.fast_path", "on")
    with pytest.raises(ConfigError, match="'model.fast_path' must be 'auto' or 'off' with "
                                          "model.compute_dtype='bfloat16'"):
        config_lib.validate(c)


def test_bfloat16_trains_digits_within_a_point_of_float32(tmp_path):
    """The whole digits set (1,437 train / 360 validation), 5 epochs, the same seed: one run per policy."""
    accuracy = {}
    for dtype in ("float32", "bfloat16"):
        c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
        c.data.cache_dir = str(tmp_path / "cache")
        c.train.num_epochs = 5
        config_lib.apply_override(c, "model.compute_dtype", dtype)
        summary = loop.train_and_evaluate(c, str(tmp_path / dtype))
        accuracy[dtype] = summary["best_val_accuracy"]
    assert accuracy["float32"] > 0.9  # a real training, not two failures that agree
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.01, accuracy
