"""Populations (ensemble.sweep): one member per combination x seeds, swept values as per-member arrays in one
compiled step; member m equals the plain run with its values and seed."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax import config as config_lib, loop, optim, steps
from imgclf_jax.ensemble import population, steps as ens_steps
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import create_model

from test_ensemble import EPOCHS, read, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parse_and_member_order():
    assert population.parse_sweep("") == []
    assert population.parse_sweep(" optimizer.learning_rate = 0.01, 1e-3 ; model.l2=0,1e-5;") == [
        ("optimizer.learning_rate", [0.01, 0.001]), ("model.l2", [0.0, 1e-5])]
    c = config_lib.base_config()
    c.seed, c.ensemble.num_members = 7, 2
    c.ensemble.sweep = "optimizer.learning_rate=0.01,0.001;model.l2=0,1e-5"
    got = [(m.seed, m.values["optimizer.learning_rate"], m.values["model.l2"]) for m in population.members(c)]
    assert got == [(7, 0.01, 0.0), (8, 0.01, 0.0), (7, 0.01, 1e-5), (8, 0.01, 1e-5),
                   (7, 0.001, 0.0), (8, 0.001, 0.0), (7, 0.001, 1e-5), (8, 0.001, 1e-5)]
    assert population.population_size(c) == 8
    values = population.member_values(c)
    assert values["model.l2"].dtype == np.float32 and values["model.l2"].tolist() == pytest.approx(
        [0, 0, 1e-5, 1e-5] * 2)
    member = population.member_config(c, population.members(c)[5])
    assert (member.seed, member.optimizer.learning_rate, member.model.l2) == (8, 0.001, 0.0)
    assert member.ensemble.num_members == 1 and member.ensemble.sweep == "" and c.ensemble.num_members == 2
    c.ensemble.sweep = ""
    assert [m.seed for m in population.members(c)] == [7, 8]


@pytest.mark.parametrize("sweep, message", [
    ("model.conv_filters=8,16", "'model.conv_filters' (a key of this config) cannot be swept"),
    ("train.batch_size=16,32", "'train.batch_size' (a key of this config) cannot be swept"),
    ("model.nmae=1,2", "'model.nmae' (not a key of this config) cannot be swept"),
    ("optimizer.learning_rate=0.01", "gives one combination: set the key itself"),
    ("optimizer.learning_rate=0.01,-1", "member (optimizer.learning_rate=-1)"),
    ("optimizer.weight_decay=0,1e-4", "member (optimizer.weight_decay=0.0001): config key 'optimizer.weight_decay'"),
    ("loss.label_smoothing=0,1.5", "member (loss.label_smoothing=1.5)"),
    ("mixing.probability=0.5,1", "member (mixing.probability=0.5)"),
    ("optimizer.learning_rate", "is not KEY=V1,V2"),
    ("optimizer.learning_rate=0.1,x", "value 'x' is not a number"),
    ("optimizer.learning_rate=0.1,0.1", "lists the value 0.1 twice"),
    ("model.l2=0,1;model.l2=2,3", "key 'model.l2' is given twice"),
    ("model.l2=0,nan", "is not finite"),
    ("model.dense_dropouts=0.1,0.2", "'model.dense_dropouts' (a key of this config) cannot be swept"),
    ("model.dense_dropouts[3]=0.1,0.2", "model.dense_dropouts has 1 element(s) in this config, indices 0..0"),
    ("model.dense_dropouts[x]=0.1,0.2", "is not KEY or KEY[i]"),
    ("model.conv_dropouts[0]=0,1", "member (model.conv_dropouts[0]=1)"),
])
def test_bad_sweeps_are_one_line_errors_naming_the_part(sweep, message):
    c = config_lib.base_config()  # keras_adam: no weight decay; no batch transform: mixing.* unused
    c.ensemble.sweep = sweep
    with pytest.raises(ConfigError, match="ensemble.sweep") as e:
        config_lib.validate(c)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_command_line_refusal_is_one_line():
    done = subprocess.run([sys.executable, "-m", "imgclf_jax.train", "--config", "configs/digits.py",
                           "--config.ensemble.sweep=model.name=1,2", "--workdir", "/nonexistent/never"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "'model.name' (a key of this config) cannot be swept" in done.stderr


def _sgd_config():
    c = config_lib.base_config()
    c.model.conv_filters, c.model.conv_kernel_sizes = (3,), (3,)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("valid",), (True,), (0.0,)
    c.model.dense_units, c.model.dense_dropouts = (4,), (0.25,)
    c.optimizer.name, c.optimizer.momentum, c.optimizer.nesterov = "sgd", 0.9, True
    c.optimizer.schedule, c.optimizer.warmup_epochs = "one_cycle", 1.0
    c.train.num_epochs = 3
    c.ensemble.mapping = "vmap"
    c.ensemble.sweep = "optimizer.learning_rate=0.05,0.2;optimizer.weight_decay=0,5e-3;loss.label_smoothing=0,0.1"
    config_lib.validate(c)
    return c


def start_population(c, model, hooks, batch_size, num_batches, seed):
    """(members, values, init_keys, dropout_keys, state, batches): a population's initial state and random
    member-stacked batches of 8x8 images, 3 classes."""
    members = population.members(c)
    k = len(members)
    values = {key: jnp.asarray(v) for key, v in population.member_values(c).items()}
    init_keys, dropout_keys = ens_steps.member_keys(0, k, [m.seed for m in members])
    state = ens_steps.create_ensemble_state(model, None, init_keys, 8, values=values, hooks=hooks)
    rng = np.random.default_rng(seed)
    batches = [{"image": rng.random((k, batch_size, 8, 8, 3), dtype=np.float32),
                "label": rng.integers(0, 3, (k, batch_size)).astype(np.int32),
                "mask": np.ones((k, batch_size), bool)} for _ in range(num_batches)]
    return members, values, init_keys, dropout_keys, state, batches


def assert_member_is(pop, metrics, m, single, single_metrics):
    """Member m of the population state and step metrics equals the plain run's state and metrics."""
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x: x[m], pop.members.params)),
                         jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss_sum"][m]), float(single_metrics["loss_sum"]), rtol=1e-4)


@pytest.mark.parametrize("mode", ["vmap", "unroll"])
def test_population_step_equals_each_members_plain_step_and_compiles_once(mode):
    """Three steps of an 8-member SGD population (learning rate x weight decay x label smoothing) against
    the plain step of each member's config; the values are arguments: new values reuse the compilation."""
    c = _sgd_config()
    model = create_model(c.model, 3)
    spe = 4  # updates per epoch
    traces = []
    build = population.member_hooks(c, 3, spe)

    def hooks(values):
        traces.append(1)
        return build(values)

    members, values, init_keys, dropout_keys, state, batches = start_population(c, model, hooks, 4, 3, seed=0)

    @jax.jit
    def step(state, batch, member_values):
        return ens_steps.ensemble_train_step(state, batch, dropout_keys, member_values, model=model, tx=None, l2=0.0,
                                             mode=mode, shared_data=False, hooks=hooks)

    pop = state
    for batch in batches:
        pop, metrics = step(pop, batch, values)
    traced = len(traces)
    for m, member in enumerate(members):
        mc = population.member_config(c, member)
        tx, _ = optim.create_optimizer(mc.optimizer, steps_per_epoch=spe, num_epochs=mc.train.num_epochs)
        loss_fn, transform, _ = steps.recipe_hooks(mc, 3)
        single = steps.create_train_state(model, tx, init_keys[m], 8)
        for batch in batches:
            one = {key: v[m] for key, v in batch.items()}
            single, single_metrics = steps.train_step(single, one, dropout_keys[m], model=model, tx=tx,
                                                      l2=mc.model.l2, loss_fn=loss_fn, batch_transform=transform)
        assert_member_is(pop, metrics, m, single, single_metrics)
    # The members differ (the values matter), and other values run without tracing again.
    kernels = np.asarray(pop.members.params["logits"]["kernel"])
    assert not np.allclose(kernels[0], kernels[-1])
    other = {key: v * 0.5 for key, v in values.items()}
    step(pop, batches[0], other)
    assert len(traces) == traced


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_swept_dropout_rates_equal_each_members_plain_step(fast_path):
    """A population over two dropout rates (conv layer 0: 0 or 0.3; dense layer 0: 0.25 or 0.5): each member's
    two steps equal the plain step of its config, where rate 0 means no layer at all; the rate is an argument."""
    c = config_lib.base_config()
    c.model.conv_filters, c.model.conv_kernel_sizes = (3,), (3,)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("valid",), (True,), (0.0,)
    c.model.dense_units, c.model.dense_dropouts = (6,), (0.25,)
    c.model.fast_path = fast_path
    c.ensemble.sweep = "model.conv_dropouts[0]=0,0.3;model.dense_dropouts[0]=0.25,0.5"
    config_lib.validate(c)
    spe = 4
    model = create_model(c.model, 3)
    hooks = population.member_hooks(c, 3, spe)
    members, values, init_keys, dropout_keys, state, batches = start_population(c, model, hooks, 8, 2, seed=1)
    assert [m.values for m in members][1] == {"model.conv_dropouts[0]": 0.0, "model.dense_dropouts[0]": 0.5}
    k = len(members)
    step = jax.jit(lambda state, batch, v: ens_steps.ensemble_train_step(
        state, batch, dropout_keys, v, model=model, tx=None, l2=0.0, mode="vmap", shared_data=False, hooks=hooks))
    pop = state
    for batch in batches:
        pop, metrics = step(pop, batch, values)
    losses = []
    for m, member in enumerate(members):
        mc = population.member_config(c, member)
        assert mc.model.conv_dropouts == (member.values["model.conv_dropouts[0]"],)
        single_model = create_model(mc.model, 3)
        tx, _ = optim.create_optimizer(mc.optimizer, steps_per_epoch=spe, num_epochs=mc.train.num_epochs)
        single = steps.create_train_state(single_model, tx, init_keys[m], 8)
        for batch in batches:
            one = {key: v[m] for key, v in batch.items()}
            single, single_metrics = steps.train_step(single, one, dropout_keys[m], model=single_model, tx=tx,
                                                      l2=mc.model.l2)
        assert_member_is(pop, metrics, m, single, single_metrics)
        losses.append(float(metrics["loss_sum"][m]))
    assert len(set(losses)) == k  # the rates change the members (same seed: only the rates differ)


@pytest.fixture(scope="module")
def singles(small_competition, tmp_path_factory):
    """Plain runs of the first and last member's values (learning rate, L2), seed 3: (summary, history)."""
    tmp = tmp_path_factory.mktemp("pop_single")
    runs = {}
    for lr, l2 in ((3e-3, 0.0), (1e-2, 1e-3)):
        c = small_config(small_competition, str(tmp / "cache"))
        c.optimizer.learning_rate, c.model.l2 = lr, l2
        loop.train_and_evaluate(c, str(tmp / f"{lr}_{l2}"))
        runs[(lr, l2)] = (read(tmp / f"{lr}_{l2}", "summary.json"), read(tmp / f"{lr}_{l2}", "history.json"))
    return runs


@pytest.mark.parametrize("mapping", ["unroll", "vmap"])
def test_member_m_follows_the_plain_run_of_its_values_and_seed(mapping, singles, small_competition, tmp_path):
    c = small_config(small_competition, str(tmp_path / "cache"), mapping=mapping,
                     sweep="optimizer.learning_rate=3e-3,1e-2;model.l2=0,1e-3")
    summary = loop.train_and_evaluate(c, str(tmp_path / "pop"))
    history = read(tmp_path / "pop", "history.json")
    assert summary["num_members"] == 4 and len(history[0]["val_accuracy"]) == 4
    num_val = summary["num_val_examples"]
    for m, key in ((0, (3e-3, 0.0)), (3, (1e-2, 1e-3))):
        single, single_history = singles[key]
        member = summary["members"][m]
        assert member["seed"] == 3
        assert member["values"] == {"optimizer.learning_rate": key[0], "model.l2": key[1]}
        assert member["epochs_trained"] == single["epochs_run"] and member["best_epoch"] == single["best_epoch"]
        for epoch, expected in enumerate(single_history):
            got = history[epoch]
            np.testing.assert_allclose(got["train_loss"][m], expected["train_loss"], rtol=1e-4)
            np.testing.assert_allclose(got["val_loss"][m], expected["val_loss"], rtol=1e-4)
            assert abs(got["val_accuracy"][m] - expected["val_accuracy"]) * num_val <= 1 + 1e-9
            np.testing.assert_allclose(got["learning_rate"][m], expected["learning_rate"], rtol=1e-6)
    ranking = summary["sweep"]["ranking"]
    assert summary["sweep"]["keys"] == ["optimizer.learning_rate", "model.l2"]
    assert sorted(r["member"] for r in ranking) == [0, 1, 2, 3]
    best = [r["best_val_accuracy"] for r in ranking]
    assert best == sorted(best, reverse=True)
    assert [r["best_val_accuracy"] for r in ranking] == [summary["members"][r["member"]]["best_val_accuracy"]
                                                         for r in ranking]
    if mapping == "unroll":  # compare shows the population: the swept keys as the members' columns
        out = tmp_path / "report.html"
        done = subprocess.run([sys.executable, "-m", "imgclf_jax.compare", str(tmp_path / "pop"), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        from test_compare import table_rows

        rows = table_rows(out.read_text())
        assert rows[0][:3] == ["run", "model.l2", "optimizer.learning_rate"]
        assert rows[1][:3] == ["pop member 0", "0", "0.003"] and rows[4][:3] == ["pop member 3", "0.001", "0.01"]
        assert rows[5][0] == "pop majority vote" and rows[5][1:3] == ["-", "-"]
