"""The train state carries a model's BatchNorm statistics and the EMA weights.

A tiny BatchNorm model (conv -> BatchNorm(mask) -> ReLU -> mean -> dense), registered for these tests
with ``takes_mask=True``, goes through the real steps: its statistics are updated in training, used in
evaluation, computed over the real rows only, over the global batch under data parallelism, and stacked
per member in an ensemble step. The EMA update is checked against the formula by hand.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imgclf_jax import parallel, steps
from imgclf_jax.ensemble import steps as ens_steps
from imgclf_jax.models import MODELS, LayerSpec, ModelEntry


class TinyBN(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, images, *, train: bool, mask=None):
        x = nn.Conv(3, (3, 3), padding="SAME", use_bias=False, name="conv")(images)
        bn_mask = None if mask is None else mask[:, None, None, None]
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(
            x, mask=None if bn_mask is None else jnp.broadcast_to(bn_mask, x.shape))
        return nn.Dense(self.num_classes, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


TINY_BN = ModelEntry(
    name="tiny_bn", module_type=TinyBN, config=ml_collections.ConfigDict, validate=lambda m, size: None,
    create=lambda m, num_classes: TinyBN(num_classes),
    layer_specs=lambda m, size, c: [LayerSpec("conv", "conv", (size, size, 3), 81, size * size * 81, "main"),
                                    LayerSpec("bn", "batch_norm", (size, size, 3), 6, 0, "main"),
                                    LayerSpec("head", "dense", (c,), 3 * c + c, 3 * c, "head")],
    regularized_kernels=lambda params: {}, takes_mask=True)


@pytest.fixture
def model():
    MODELS.register("tiny_bn", TINY_BN)
    try:
        yield TinyBN(num_classes=3)
    finally:
        MODELS.unregister("tiny_bn")


def batch_of(n_real, n_pad=0, size=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.integers(0, 3, n_real), np.zeros(n_pad, int)])
    images = np.full((n_real + n_pad, size, size, 3), 1e4, np.float32)  # padding rows: huge pixels
    images[:n_real] = rng.uniform(size=(n_real, size, size, 3))
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32),
            "mask": jnp.asarray(np.arange(n_real + n_pad) < n_real)}


def fresh_state(model, ema_decay=0.0, lr=0.1):
    return steps.create_train_state(model, optax.sgd(lr), jax.random.key(0), 6, ema_decay)


def test_batch_norm_statistics_live_in_the_state_update_in_training_and_serve_evaluation(model):
    state = fresh_state(model)
    assert set(state.model_state) == {"batch_stats"}
    stats0 = state.model_state["batch_stats"]["bn"]
    np.testing.assert_array_equal(stats0["mean"], np.zeros(3))
    batch = batch_of(8)
    new, _ = steps.train_step(state, batch, jax.random.key(1), model=model, tx=optax.sgd(0.1), l2=0.0)
    # momentum 0.5: running mean = 0.5 * 0 + 0.5 * (batch mean of the conv outputs, by channel).
    conv = nn.Conv(3, (3, 3), padding="SAME", use_bias=False).apply(
        {"params": state.params["conv"]}, batch["image"])
    np.testing.assert_allclose(new.model_state["batch_stats"]["bn"]["mean"],
                               0.5 * np.asarray(conv).mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    # Evaluation uses the running statistics: eval_step on the state's variables equals apply in eval mode.
    _, probs = steps.eval_step(steps.eval_variables(new), batch, model=model, l2=0.0)
    logits = model.apply({"params": new.params, **new.model_state}, batch["image"], train=False)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), rtol=1e-6)
    train_logits, _ = model.apply({"params": new.params, **new.model_state}, batch["image"], train=True,
                                  mutable=["batch_stats"])
    assert not np.allclose(logits, train_logits)  # the batch's own statistics differ from the running ones


def test_padding_rows_never_reach_the_batch_statistics_or_the_gradients(model):
    state = fresh_state(model)
    tx = optax.sgd(0.1)
    key = jax.random.key(1)
    real, _ = steps.train_step(state, batch_of(5), key, model=model, tx=tx, l2=0.0)
    padded, _ = steps.train_step(fresh_state(model), batch_of(5, n_pad=3), key, model=model, tx=tx, l2=0.0)
    for a, b in zip(jax.tree.leaves((real.params, real.model_state)),
                    jax.tree.leaves((padded.params, padded.model_state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_statistics_are_over_the_global_batch_on_two_devices(model):
    if jax.local_device_count() < 2:
        pytest.skip("needs 2 devices (the tests' XLA_FLAGS force 2 host devices)")
    tx = optax.sgd(0.1)
    batch = batch_of(8)
    results = []
    for devices in (jax.local_devices()[:1], jax.local_devices()[:2]):
        mesh = parallel.make_mesh(8, devices)
        step = steps.jit_train_step(model, tx, 0.0, mesh)
        state = jax.device_put(fresh_state(model), parallel.replicated(mesh))
        new, _ = step(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
        results.append(jax.device_get((new.params, new.model_state)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_ema_update_by_hand(model):
    decay = 0.9
    # min(decay, (1 + t) / (10 + t)): t = 1 -> 2/11, t = 100 -> 0.9 (the cap).
    np.testing.assert_allclose(steps.ema_decay_at(decay, 1), 2 / 11, rtol=1e-7)
    np.testing.assert_allclose(steps.ema_decay_at(decay, 100), 0.9, rtol=1e-7)
    state = fresh_state(model, ema_decay=decay)
    assert state.ema["params"] is not None and set(state.ema) == {"params", "batch_stats"}
    new, _ = steps.train_step(state, batch_of(8), jax.random.key(1), model=model, tx=optax.sgd(0.1), l2=0.0,
                              ema_decay=decay)
    d = 2 / 11
    expected = jax.tree.map(lambda e, v: d * e + (1 - d) * v, {"params": state.params, **state.model_state},
                            {"params": new.params, **new.model_state})
    for a, b in zip(jax.tree.leaves(new.ema), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert steps.eval_variables(new) is new.ema  # evaluation uses the average when it is on
    off = steps.train_step(fresh_state(model), batch_of(8), jax.random.key(1), model=model,
                           tx=optax.sgd(0.1), l2=0.0)[0]
    assert off.ema is None and set(steps.eval_variables(off)) == {"params", "batch_stats"}


def test_each_ensemble_member_keeps_its_own_statistics_equal_to_its_plain_run(model):
    tx = optax.sgd(0.1)
    keys = jax.random.split(jax.random.key(3), 2)
    state = ens_steps.create_ensemble_state(model, tx, keys, 6, 0.9)
    batches = [batch_of(6, n_pad=2, seed=s) for s in (0, 1)]
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), *batches)
    dropout = jax.random.split(jax.random.key(4), 2)
    new, metrics = ens_steps.ensemble_train_step(state, stacked, dropout, model=model, tx=tx, l2=0.0,
                                                 mode="unroll", shared_data=False, ema_decay=0.9)
    assert bool(np.all(metrics["updated"]))
    for i in (0, 1):
        plain = steps.create_train_state(model, tx, keys[i], 6, 0.9)
        plain, _ = steps.train_step(plain, batches[i], dropout[i], model=model, tx=tx, l2=0.0, ema_decay=0.9)
        member = jax.tree.map(lambda x: x[i], new.members)
        for a, b in zip(jax.tree.leaves((member.model_state, member.ema)), jax.tree.leaves((plain.model_state,
                                                                                              plain.ema))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    means = new.members.model_state["batch_stats"]["bn"]["mean"]
    assert means.shape == (2, 3) and not np.allclose(means[0], means[1])


def test_a_bare_params_tree_is_read_as_variables():
    tree = {"conv_0": {"kernel": jnp.ones(2)}}
    assert steps.as_variables(tree) == {"params": tree}
    variables = {"params": tree, "batch_stats": {}}
    assert steps.as_variables(variables) == variables


def test_a_checkpoint_of_the_older_state_layout_restores_into_todays_state(tmp_path):
    """Runs interrupted before model_state/ema existed: their state (step, params, opt_state) and bare best
    params tree restore into today's TrainState (model_state {}, ema None) and best variables."""
    from imgclf_jax import checkpoint as ckpt_lib

    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    tx = optax.adam(1e-3)
    @flax.struct.dataclass
    class OldTrainState:  # steps.TrainState before issue 15
        step: jax.Array
        params: dict
        opt_state: tuple

    old_state = OldTrainState(step=jnp.int32(7), params=params, opt_state=tx.init(params))
    with ckpt_lib.RunCheckpoints(str(tmp_path)) as checkpoints:
        checkpoints.save_latest(7, old_state, params, {"epoch": 1})
    new_state = steps.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    abstract = jax.eval_shape(lambda: new_state)
    abstract_best = jax.eval_shape(lambda: {"params": params})
    with ckpt_lib.RunCheckpoints(str(tmp_path)) as checkpoints:
        state, best, loop = checkpoints.restore_latest(abstract, abstract_best)
    assert isinstance(state, steps.TrainState) and int(state.step) == 7
    assert state.model_state == {} and state.ema is None and loop == {"epoch": 1}
    np.testing.assert_array_equal(state.params["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_array_equal(best["params"]["dense"]["bias"], params["dense"]["bias"])

    # An ensemble's state: the stacked members inside EnsembleState.
    stacked = jax.tree.map(lambda x: jnp.stack([x, x + 1]), old_state)
    old_ensemble = ens_steps.EnsembleState(members=stacked, active=jnp.array([True, False]))
    with ckpt_lib.RunCheckpoints(str(tmp_path / "ens")) as checkpoints:
        checkpoints.save_latest(3, old_ensemble, None, {})
    new_members = steps.TrainState(step=stacked.step, params=stacked.params, opt_state=stacked.opt_state)
    abstract = jax.eval_shape(lambda: ens_steps.EnsembleState(members=new_members, active=jnp.ones(2, bool)))
    with ckpt_lib.RunCheckpoints(str(tmp_path / "ens")) as checkpoints:
        state, best, _ = checkpoints.restore_latest(abstract, None)
    assert isinstance(state.members, steps.TrainState) and best is None
    assert state.members.model_state == {} and state.members.ema is None
    np.testing.assert_array_equal(state.active, [True, False])
    np.testing.assert_array_equal(state.members.step, [7, 8])


def test_train_step_refuses_an_ema_setting_the_state_does_not_have_and_a_stateful_model_without_the_mask(model):
    tx = optax.sgd(0.1)
    batch = batch_of(4)
    plain = steps.create_train_state(model, tx, jax.random.key(0), 6)  # ema None
    with pytest.raises(ValueError, match="ema_decay=0.9 but the state's ema is None"):
        steps.train_step(plain, batch, jax.random.key(1), model=model, tx=tx, l2=0.0, ema_decay=0.9)
    averaged = steps.create_train_state(model, tx, jax.random.key(0), 6, ema_decay=0.9)
    with pytest.raises(ValueError, match="ema_decay=0.0 but the state's ema is set"):
        steps.train_step(averaged, batch, jax.random.key(1), model=model, tx=tx, l2=0.0)
    MODELS.unregister("tiny_bn")  # the same module under an entry that forgets takes_mask
    MODELS.register("tiny_bn", TINY_BN.__class__(**{**TINY_BN.__dict__, "takes_mask": False}))
    with pytest.raises(ValueError, match=r"model 'tiny_bn' keeps \['batch_stats'\] but its ModelEntry does not set "
                                         "takes_mask"):
        steps.train_step(plain, batch, jax.random.key(1), model=model, tx=tx, l2=0.0)


def test_a_checkpoint_from_inside_the_first_epoch_has_no_best_weights_and_restores_without_them(tmp_path):
    """A run interrupted before its first epoch ended (no best epoch yet: save_latest writes no best_params)
    resumes although the job keeps best weights (it asks for them); it had failed as 'corrupt'."""
    from imgclf_jax import checkpoint as ckpt_lib

    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    state = steps.TrainState(step=jnp.int32(1), params=params, opt_state=optax.adam(1e-3).init(params))
    with ckpt_lib.RunCheckpoints(str(tmp_path)) as checkpoints:
        checkpoints.save_latest(1, state, None, {"epoch": 0})
    abstract_best = jax.eval_shape(lambda: {"params": params})
    with ckpt_lib.RunCheckpoints(str(tmp_path)) as checkpoints:
        restored, best, loop = checkpoints.restore_latest(jax.eval_shape(lambda: state), abstract_best)
    assert best is None and loop == {"epoch": 0} and int(restored.step) == 1
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], params["dense"]["kernel"])
