"""Every registered entry, through init, one jitted step and a finiteness check.

One parameterized test per table (optax's ``transform_test.py`` does this for
every constructor): an entry added to a table is tested here without anyone
remembering to write its test. Models, optimizers, schedules, losses,
augmentation ops, batch transforms and evaluation transforms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax import batch_transforms, config as config_lib, eval_transforms, losses, steps
from imgclf_jax.data import augment
from imgclf_jax.models import MODELS, create_model, layer_specs
from imgclf_jax.optim import OPTIMIZERS, SCHEDULES, create_optimizer

IMAGE_SIZE, NUM_CLASSES, BATCH = 32, 3, 4


def _config(**changes):
    """base_config with `changes` ({dotted key: value}); model.name goes through select_model."""
    c = config_lib.base_config()
    if "model.name" in changes:
        config_lib.select_model(c, changes.pop("model.name"))
    for key, value in changes.items():
        parent, name = config_lib._lookup(c, key)
        parent[name] = value
    config_lib.validate(c)
    return c


def _batch(images=None, seed=0):
    rng = np.random.default_rng(seed)
    if images is None:
        images = rng.uniform(0, 1, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, len(images)).astype(np.int32)
    mask = np.ones(len(images), bool)
    mask[-1] = False  # a padded row, as the pipeline's last batch has
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels), "mask": jnp.asarray(mask)}


def _one_step(c, batch, loss_fn=None, batch_transform=None):
    """Init from the config, one jitted train step; returns (state before, state after, metrics)."""
    model = create_model(c.model, NUM_CLASSES)
    tx, schedule = create_optimizer(c.optimizer, steps_per_epoch=100, num_epochs=c.train.num_epochs)
    size = batch["image"].shape[1]
    state = jax.jit(lambda key: steps.create_train_state(model, tx, key, size))(jax.random.key(0))  # one compile
    before = jax.tree.map(np.asarray, state.params)
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=c.model.l2, loss_fn=loss_fn,
                                     batch_transform=batch_transform))
    state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(schedule(0)))
    return before, state, jax.device_get(metrics)


def _assert_trained(before, state, metrics):
    assert np.isfinite(metrics["loss_sum"]) and metrics["count"] == BATCH - 1
    assert 0 <= metrics["correct"] <= BATCH - 1
    leaves = jax.tree.leaves(state.params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(before), leaves))
    assert int(state.step) == 1


def _first_of_its_module(name: str) -> bool:
    """Whether `name` is the first registered entry of its flax module (the others are variants: the same
    module at other config defaults, e.g. 'resnet18' of 'resnet')."""
    return next(n for n in MODELS.names() if MODELS[n].module_type is MODELS[name].module_type) == name


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_inits_and_takes_a_finite_step(name):
    c = _config(**{"model.name": name, "model.l2": 1e-3})
    specs = layer_specs(c.model, IMAGE_SIZE, NUM_CLASSES)
    if not _first_of_its_module(name):
        # A variant: its defaults must build, init and step with the shapes of its layer specs; the module's
        # arithmetic is the first entry's (compiled below). Traced only (jax.eval_shape), to keep CI short.
        model = create_model(c.model, NUM_CLASSES)
        tx, _ = create_optimizer(c.optimizer, steps_per_epoch=100, num_epochs=c.train.num_epochs)
        state = jax.eval_shape(lambda key: steps.create_train_state(model, tx, key, IMAGE_SIZE), jax.random.key(0))
        new, metrics = jax.eval_shape(functools.partial(steps.train_step, model=model, tx=tx, l2=1e-3), state,
                                      _batch(), jax.random.key(1))
        assert sum(s.params for s in specs) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        assert jax.tree.map(lambda x: x.shape, new.params) == jax.tree.map(lambda x: x.shape, state.params)
        assert metrics["loss_sum"].shape == ()
        return
    before, state, metrics = _one_step(c, _batch())
    assert sum(s.params for s in specs) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(before))
    _assert_trained(before, state, metrics)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_takes_a_finite_step(name):
    extra = {"optimizer.weight_decay": 1e-2} if "weight_decay" in OPTIMIZERS[name].keys else {}
    c = _config(**{"optimizer.name": name, "model.conv_filters": (4,), "model.conv_kernel_sizes": (3,),
                   "model.conv_paddings": ("valid",), "model.conv_pools": (True,), "model.conv_dropouts": (0.0,),
                   "model.dense_units": (8,), "model.dense_dropouts": (0.0,)}, **extra)
    _assert_trained(*_one_step(c, _batch()))


# Settings a schedule needs beyond its defaults (one_cycle rises over at least one update).
SCHEDULE_SETTINGS = {"one_cycle": {"optimizer.warmup_epochs": 1.0}}


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_gives_finite_positive_rates_and_a_step(name):
    c = _config(**{"optimizer.schedule": name, "model.conv_filters": (4,), "model.conv_kernel_sizes": (3,),
                   "model.conv_paddings": ("valid",), "model.conv_pools": (True,), "model.conv_dropouts": (0.0,),
                   "model.dense_units": (8,), "model.dense_dropouts": (0.0,)}, **SCHEDULE_SETTINGS.get(name, {}))
    schedule = SCHEDULES[name].create(c.optimizer, 100, c.train.num_epochs)  # 100 updates per epoch
    rates = np.asarray([schedule(jnp.int32(s)) for s in (0, 1, 100, 10_000)])
    # Rates start above 0 and peak at learning_rate (one_cycle starts below it, on purpose; a decay
    # to 0 may end at 0 after the run's last update).
    assert np.all(np.isfinite(rates)) and np.all(rates >= 0) and rates[0] > 0
    assert rates.max() == pytest.approx(c.optimizer.learning_rate, rel=1e-6)
    _assert_trained(*_one_step(c, _batch()))


def _small_cnn(**changes):
    return _config(**{"model.conv_filters": (4,), "model.conv_kernel_sizes": (3,), "model.conv_paddings": ("valid",),
                      "model.conv_pools": (True,), "model.conv_dropouts": (0.0,), "model.dense_units": (8,),
                      "model.dense_dropouts": (0.0,)}, **changes)


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_every_loss_gives_a_finite_step(name):
    c = _small_cnn(**{"loss.name": name})
    loss_fn, _, _ = steps.recipe_hooks(c)
    _assert_trained(*_one_step(c, _batch(), loss_fn=loss_fn))


def _switched_on(default):
    """A setting that turns an op key on: floats 0.1 (a fraction, degrees), bools True, ints + 1; a string
    (a mode, e.g. the crop's padding mode) keeps its default."""
    if isinstance(default, str):
        return default
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default + 0.1
    if isinstance(default, int):
        return default + 1
    raise AssertionError(f"no rule to switch on a setting of type {type(default).__name__}")


@pytest.mark.parametrize("name", augment.AUGMENT_OPS.names())
def test_every_augmentation_op_changes_images_and_feeds_a_finite_step(name):
    op = augment.AUGMENT_OPS[name]
    settings = {key: _switched_on(default) for key, default in op.defaults.items()}
    params = augment.AugmentParams(ops=(name,), **settings)
    images = np.random.default_rng(0).integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out = [augment.random_augment(image, np.random.default_rng(seed), params) for seed, image in enumerate(images)]
    assert all(o.dtype == np.float32 and o.ndim == 3 and o.shape[-1] == 3 for o in out)
    assert all(np.all(np.isfinite(o)) and o.min() >= 0 and o.max() <= 255 for o in out)
    assert any(o.shape != i.shape or not np.array_equal(o, i) for o, i in zip(out, images))  # it did something
    c = _small_cnn(**{"augment.ops": (name,), **{f"augment.{k}": v for k, v in settings.items()}})
    _assert_trained(*_one_step(c, _batch(np.stack(out) / 255.0)))


@pytest.mark.parametrize("name", batch_transforms.BATCH_TRANSFORMS.names())
def test_every_batch_transform_gives_a_finite_step(name):
    c = _small_cnn(**{"train.batch_transform": name})
    loss_fn, batch_transform, _ = steps.recipe_hooks(c, NUM_CLASSES)
    _assert_trained(*_one_step(c, _batch(), loss_fn=loss_fn, batch_transform=batch_transform))


@pytest.mark.parametrize("name", eval_transforms.EVAL_TRANSFORMS.names())
def test_every_eval_transform_gives_finite_probabilities(name):
    c = _small_cnn(**{"train.eval_transform": name})
    loss_fn, _, eval_transform = steps.recipe_hooks(c)
    model = create_model(c.model, NUM_CLASSES)
    params = steps.init_params(model, jax.random.key(0), IMAGE_SIZE)
    step = jax.jit(functools.partial(steps.eval_step, model=model, l2=0.0, loss_fn=loss_fn,
                                     eval_transform=eval_transform))
    metrics, probabilities = jax.device_get(step(params, _batch()))
    assert np.isfinite(metrics["loss_sum"]) and metrics["count"] == BATCH - 1
    assert probabilities.shape == (BATCH, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_the_tables_hold_what_the_reference_recipes_need():
    # The parameterized tests above are only as good as the tables they walk.
    assert {"branched_cnn"} <= set(MODELS.names())
    assert {"keras_adam", "adam", "adamw", "sgd"} <= set(OPTIMIZERS.names())
    assert {"constant", "exponential_decay", "warmup_cosine", "one_cycle"} <= set(SCHEDULES.names())
    assert {"keras_affine", "horizontal_flip"} <= set(augment.AUGMENT_OPS.names())
    assert {"softmax_cross_entropy"} <= set(losses.LOSSES.names())
    assert {"horizontal_flip_tta"} <= set(eval_transforms.EVAL_TRANSFORMS.names())


def test_an_op_without_keys_runs_whenever_it_is_listed():
    augment.AUGMENT_OPS.register("invert_for_test", augment.AugmentOp({}, lambda image, rng, settings: 255.0 - image))
    try:
        image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
        params = augment.AugmentParams(ops=("keras_affine", "invert_for_test"))
        assert params.active
        out = augment.random_augment(image, np.random.default_rng(0), params)
        np.testing.assert_array_equal(out, 255.0 - image.astype(np.float32))
        assert not augment.AugmentParams(ops=("keras_affine",)).active  # its keys at their defaults: off
    finally:
        augment.AUGMENT_OPS.unregister("invert_for_test")
