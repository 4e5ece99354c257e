"""Recipe hooks of the steps (issue 14 pt 5): the loss by name, the batch-transform and eval-transform slots."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imgclf_jax import batch_transforms, config as config_lib, eval_transforms, losses, parallel, steps
from imgclf_jax.ensemble import steps as ens_steps
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import create_model, l2_penalty
from imgclf_jax.optim import create_optimizer


def tiny_setup(dropout=0.3, l2=1e-3):
    c = config_lib.base_config()
    c.model.conv_filters, c.model.conv_kernel_sizes = (4,), (3,)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("same",), (True,), (0.0,)
    c.model.dense_units, c.model.dense_dropouts = (8,), (dropout,)
    c.model.l2 = l2
    model = create_model(c.model, 3)
    tx, _ = create_optimizer(c.optimizer, steps_per_epoch=1, num_epochs=c.train.num_epochs)
    return model, tx, steps.create_train_state(model, tx, jax.random.key(0), 8)


def tiny_batch(seed=0, batch=6, real=5):
    rng = np.random.default_rng(seed)
    return {"image": rng.random((batch, 8, 8, 3), dtype=np.float32),
            "label": rng.integers(0, 3, batch).astype(np.int32), "mask": np.arange(batch) < real}


def train_step_before_issue14(state, batch, key, *, model, tx, l2):
    """steps.train_step as it was before the hooks (copied, with the loss as it was in optim)."""
    dropout_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": dropout_key})
        ce = losses.softmax_cross_entropy(logits, batch["label"], batch["mask"])
        loss = ce + l2_penalty(params, l2)
        mask = batch["mask"].astype(jnp.float32)
        count = jnp.sum(mask)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * mask)
        return loss, {"loss_sum": loss * count, "correct": correct, "count": count}

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return steps.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_differ(a, b):
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture
def registered():
    """Registers test batch transforms (and a labels-only loss) for one test, removed after."""
    def zero_images(batch, key, num_classes):
        return dict(batch, image=jnp.zeros_like(batch["image"]))

    def add_noise(batch, key, num_classes):  # uses its key: shows which key the step passes
        return dict(batch, image=batch["image"] + jax.random.uniform(key, batch["image"].shape))

    def one_hot(batch, key, num_classes):
        return dict(batch, targets=jax.nn.one_hot(batch["label"], num_classes))

    entries = {"zero_images": batch_transforms.BatchTransform(zero_images, makes_targets=False),
               "add_noise": batch_transforms.BatchTransform(add_noise, makes_targets=False),
               "one_hot": batch_transforms.BatchTransform(one_hot, makes_targets=True)}
    for name, entry in entries.items():
        batch_transforms.BATCH_TRANSFORMS.register(name, entry)
    losses.LOSSES.register("labels_only", losses.LossEntry(
        lambda logits, batch: losses.softmax_cross_entropy(logits, batch["label"], batch["mask"]), soft_targets=False))
    yield entries
    for name in entries:
        batch_transforms.BATCH_TRANSFORMS.unregister(name)
    losses.LOSSES.unregister("labels_only")


def bound(entry, num_classes=3):
    """The entry's transform as the step gets it from recipe_hooks: bound to the class count."""
    return functools.partial(entry.fn, num_classes=num_classes)


# ----------------------------------------------------------------- off = today, bit for bit


def test_hooks_off_is_the_step_of_before_bit_for_bit():
    model, tx, state = tiny_setup()
    batch, key = tiny_batch(), jax.random.key(5)
    old = jax.jit(functools.partial(train_step_before_issue14, model=model, tx=tx, l2=1e-3))
    new = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=1e-3))
    # The hooks as a run gets them from its config: the loss bound to loss.label_smoothing = 0 (issue 15).
    loss_fn, batch_transform, _ = steps.recipe_hooks(config_lib.base_config())
    explicit = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=1e-3,
                                         loss_fn=loss_fn, batch_transform=batch_transform))
    a, b, c = old(state, batch, key), new(state, batch, key), explicit(state, batch, key)
    assert_trees_equal(a, b)
    assert_trees_equal(a, c)
    mesh = parallel.make_mesh(6, jax.local_devices()[:1])
    jitted = steps.jit_train_step(model, tx, 1e-3, mesh, loss_fn=None, batch_transform=None)
    assert_trees_equal(a, jitted(jax.device_put(state, parallel.replicated(mesh)), batch, key))


# ----------------------------------------------------------------- batch transform slot


def test_a_batch_transform_runs_in_the_step_before_the_forward_pass(registered):
    model, tx, state = tiny_setup()
    batch, key = tiny_batch(), jax.random.key(5)
    step = functools.partial(steps.train_step, model=model, tx=tx, l2=1e-3)
    with_transform = jax.jit(functools.partial(step, batch_transform=bound(registered["zero_images"])))(state, batch, key)
    zeros = dict(batch, image=np.zeros_like(batch["image"]))
    on_zeros = jax.jit(step)(state, zeros, key)
    np.testing.assert_allclose(with_transform[1]["loss_sum"], on_zeros[1]["loss_sum"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(with_transform[0].params), jax.tree.leaves(on_zeros[0].params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert_trees_differ(with_transform[0].params, jax.jit(step)(state, batch, key)[0].params)


def test_the_transform_key_is_folded_from_the_dropout_key_which_stays_unchanged(registered):
    model, tx, state = tiny_setup(dropout=0.5)  # dropout on: a changed dropout key would show
    state = state.replace(step=state.step + 3)
    batch, key = tiny_batch(1), jax.random.key(9)
    step = functools.partial(steps.train_step, model=model, tx=tx, l2=1e-3)
    transformed = jax.jit(functools.partial(step, batch_transform=bound(registered["add_noise"])))(state, batch, key)
    dropout_key = jax.random.fold_in(key, 3)
    noise = jax.random.uniform(jax.random.fold_in(dropout_key, batch_transforms.KEY_SALT), batch["image"].shape)
    by_hand = jax.jit(step)(state, dict(batch, image=batch["image"] + noise), key)
    np.testing.assert_allclose(transformed[1]["loss_sum"], by_hand[1]["loss_sum"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(transformed[0].params), jax.tree.leaves(by_hand[0].params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_soft_targets_from_a_transform_reach_the_loss(registered):
    model, tx, state = tiny_setup(dropout=0.0)
    batch, key = tiny_batch(2), jax.random.key(1)
    step = functools.partial(steps.train_step, model=model, tx=tx, l2=0.0)
    soft = step(state, batch, key, batch_transform=bound(registered["one_hot"]))
    plain = step(state, batch, key)  # one-hot targets = the labels: the same loss
    np.testing.assert_allclose(soft[1]["loss_sum"], plain[1]["loss_sum"], rtol=1e-6)


def test_the_ensemble_step_transforms_each_member_with_its_own_key(registered):
    model, tx, _ = tiny_setup()
    init_keys, dropout_keys = ens_steps.member_keys(0, 2)
    state = ens_steps.create_ensemble_state(model, tx, init_keys, 8)
    batch = tiny_batch(3)
    new, metrics = ens_steps.ensemble_train_step(state, batch, dropout_keys, model=model, tx=tx, l2=1e-3,
                                                 mode="unroll", shared_data=True,
                                                 batch_transform=bound(registered["add_noise"]))
    for i in range(2):  # member i = the plain step of member i with the transform
        member = jax.tree.map(lambda x: x[i], state.members)
        alone, alone_metrics = steps.train_step(member, batch, dropout_keys[i], model=model, tx=tx, l2=1e-3,
                                                batch_transform=bound(registered["add_noise"]))
        np.testing.assert_allclose(metrics["loss_sum"][i], alone_metrics["loss_sum"], rtol=1e-6)
        for x, y in zip(jax.tree.leaves(new.members.params), jax.tree.leaves(alone.params)):
            np.testing.assert_allclose(x[i], y, rtol=1e-6, atol=1e-7)
    _, off = ens_steps.ensemble_train_step(state, batch, dropout_keys, model=model, tx=tx, l2=1e-3,
                                           mode="unroll", shared_data=True)
    assert not np.allclose(metrics["loss_sum"], off["loss_sum"])


# ----------------------------------------------------------------- eval transform slot


def test_horizontal_flip_tta_gives_the_mean_of_the_two_softmaxes():
    model, _, state = tiny_setup()
    batch = tiny_batch(4)
    mesh = parallel.make_mesh(6, jax.local_devices()[:1])
    tta = eval_transforms.EVAL_TRANSFORMS["horizontal_flip_tta"]
    metrics, probs = steps.jit_eval_step(model, 1e-3, mesh, eval_transform=tta)(
        jax.device_put(state.params, parallel.replicated(mesh)), batch)
    apply = functools.partial(model.apply, {"params": state.params}, train=False)
    a = jax.nn.softmax(apply(batch["image"]), axis=-1)
    b = jax.nn.softmax(apply(batch["image"][:, :, ::-1]), axis=-1)
    assert not np.allclose(a, b, atol=1e-4)  # the mirror is another view
    np.testing.assert_allclose(probs, (a + b) / 2, rtol=1e-5, atol=1e-7)
    # The loss is the cross-entropy of the mean probabilities over the 5 real rows, plus the L2 term.
    mean = np.asarray((a + b) / 2, np.float64)
    ce = -np.mean(np.log(mean[np.arange(5), batch["label"][:5]]))
    penalty = float(l2_penalty(state.params, 1e-3))
    np.testing.assert_allclose(float(metrics["loss_sum"]) / 5, ce + penalty, rtol=1e-5)
    plain, plain_probs = steps.eval_step(state.params, batch, model=model, l2=1e-3)
    np.testing.assert_array_equal(plain_probs, steps.eval_step(state.params, batch, model=model, l2=1e-3,
                                                               eval_transform=None)[1])
    np.testing.assert_allclose(plain_probs, a, rtol=1e-6)


def test_the_ensemble_eval_step_applies_the_eval_transform_per_member():
    model, tx, _ = tiny_setup()
    init_keys, _ = ens_steps.member_keys(0, 2)
    params = ens_steps.create_ensemble_state(model, tx, init_keys, 8).members.params
    batch = tiny_batch(5)
    tta = eval_transforms.EVAL_TRANSFORMS["horizontal_flip_tta"]
    _, probs = ens_steps.ensemble_eval_step(params, batch, model=model, l2=0.0, mode="vmap", eval_transform=tta)
    for i in range(2):
        _, alone = steps.eval_step(jax.tree.map(lambda x: x[i], params), batch, model=model, l2=0.0,
                                   eval_transform=tta)
        np.testing.assert_allclose(probs[i], alone, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------- recipe_hooks


def test_recipe_hooks_of_a_config(registered):
    c = config_lib.base_config()
    loss_fn, transform, evaluation = steps.recipe_hooks(c)
    # The loss comes bound to its keys (issue 15: loss.label_smoothing), at their defaults here.
    assert loss_fn.func is losses.LOSSES["softmax_cross_entropy"].fn and loss_fn.keywords == {"label_smoothing": 0.0}
    assert transform is None and evaluation is None
    c.train.batch_transform, c.train.eval_transform = "zero_images", "horizontal_flip_tta"
    config_lib.validate(c)
    _, transform, evaluation = steps.recipe_hooks(c, num_classes=3)
    assert transform.func is registered["zero_images"].fn and transform.keywords == {"num_classes": 3}
    assert evaluation is eval_transforms.horizontal_flip_tta
    # A run's config.json from before these keys: the defaults.
    old = ml_collections.ConfigDict({"train": {"batch_size": 4}, "model": {"l2": 0.0}})
    loss_fn, transform, evaluation = steps.recipe_hooks(old)
    assert (loss_fn.func, loss_fn.keywords, transform, evaluation) == (
        losses.LOSSES["softmax_cross_entropy"].fn, {"label_smoothing": 0.0}, None, None)


def test_a_loss_that_cannot_take_soft_targets_is_refused_at_build_time(registered):
    c = config_lib.base_config()
    c.loss.name, c.train.batch_transform = "labels_only", "one_hot"
    message = ("config key 'loss.name' ('labels_only') reads only the labels, but train.batch_transform='one_hot' "
               "makes soft targets: choose a loss that takes them (e.g. 'softmax_cross_entropy') or no batch transform")
    for build in (config_lib.validate, steps.recipe_hooks):
        with pytest.raises(ConfigError) as info:
            build(c)
        assert str(info.value) == message
    c.train.batch_transform = "zero_images"  # no targets: a labels-only loss is fine
    config_lib.validate(c)
    assert steps.recipe_hooks(c, num_classes=3)[0] is losses.LOSSES["labels_only"].fn


@pytest.mark.parametrize("key, value, message", [
    ("loss.name", "focal", "config key 'loss.name' must be one of ('softmax_cross_entropy',), got 'focal'"),
    ("train.batch_transform", "cutout", "config key 'train.batch_transform' must be '' (off) or one of "
                                        "('mixup', 'cutmix', 'mixup_cutmix'), got 'cutout'"),
    ("train.eval_transform", "tta", "config key 'train.eval_transform' must be '' (off) or one of "
                                    "('horizontal_flip_tta', 'flip_shift_tta'), got 'tta'"),
])
def test_unknown_recipe_names_are_one_line_errors(key, value, message):
    c = config_lib.base_config()
    config_lib.apply_override(c, key, value)
    with pytest.raises(ConfigError) as info:
        steps.recipe_hooks(c)
    assert str(info.value) == message
