"""The name -> entry tables owned by their components (issue 14 pt 4) and the config checks that read them.

Optimizers, schedules, builders, ensemble mappings and vote rules are each a
:class:`imgclf_jax.registry.Registry` in the module that implements them; the
config schema's optimizer section is the union of the entries' keys, and a key
the chosen entry does not read must stay at its default.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgclf_jax import cli, config as config_lib, optim, parallel, steps
from imgclf_jax.data import builders
from imgclf_jax.ensemble import mapping, voting
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(*overrides):
    return cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), *overrides]).config


# ----------------------------------------------------------------- unused keys are refused


@pytest.mark.parametrize("overrides, message", [
    (("--config.optimizer.name=adam", "--config.optimizer.weight_decay=0.01"),
     "config key 'optimizer.weight_decay' (0.01) is not used by optimizer.name='adam': leave it at 0.0, "
     "or choose an entry that uses it"),
    (("--config.optimizer.weight_decay=0.01",),  # ml1: keras_adam
     "config key 'optimizer.weight_decay' (0.01) is not used by optimizer.name='keras_adam': leave it at 0.0"),
    (("--config.optimizer.decay_rate=0.9",),  # ml1: constant schedule
     "config key 'optimizer.decay_rate' (0.9) is not used by optimizer.schedule='constant': leave it at 1.0"),
    (("--config.optimizer.decay_steps=1000",),
     "config key 'optimizer.decay_steps' (1000) is not used by optimizer.schedule='constant': leave it at 1"),
    (("--config.optimizer.staircase=true",),
     "config key 'optimizer.staircase' (True) is not used by optimizer.schedule='constant': leave it at False"),
])
def test_a_key_the_chosen_entry_ignores_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        parse(*overrides)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_keys_the_chosen_entry_reads_and_keys_at_their_default_are_accepted():
    c = parse("--config.optimizer.name=adamw", "--config.optimizer.weight_decay=0.01")
    assert c.optimizer.weight_decay == 0.01
    c = parse("--config.optimizer.schedule=exponential_decay", "--config.optimizer.decay_rate=0.9",
              "--config.optimizer.decay_steps=1000", "--config.optimizer.staircase=true")
    assert (c.optimizer.decay_rate, c.optimizer.decay_steps, c.optimizer.staircase) == (0.9, 1000, True)
    c = parse("--config.optimizer.name=adam", "--config.optimizer.weight_decay=0.0")  # at its default
    assert c.optimizer.name == "adam"
    ml4 = cli.parse_args(["--config", str(ROOT / "configs/ml4.py")]).config  # a reference decaying config
    assert ml4.optimizer.schedule == "exponential_decay" and ml4.optimizer.decay_rate == 1.5


def test_value_checks_run_whatever_the_choice():
    # Today's messages and order: a bad value of a key is named even if the chosen entry ignores it.
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.decay_steps' must be >= 1 update, got 0$"):
        parse("--config.optimizer.decay_steps=0")
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.weight_decay' must be >= 0, got -0.5$"):
        parse("--config.optimizer.weight_decay=-0.5")
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.b1' must be in \[0, 1\), got 1.0$"):
        parse("--config.optimizer.b1=1.0")
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.learning_rate' must be > 0, got 0.0$"):
        parse("--config.optimizer.learning_rate=0")


@pytest.mark.parametrize("override, message", [
    ("--config.optimizer.name=lamb", "config key 'optimizer.name' must be one of ('keras_adam', 'adam', 'adamw', "
                                     "'sgd'), got 'lamb'"),
    ("--config.optimizer.schedule=cosine", "config key 'optimizer.schedule' must be one of "
                                           "('constant', 'exponential_decay', 'warmup_cosine', 'one_cycle'), "
                                           "got 'cosine'"),
    ("--config.data.builder=csv", "config key 'data.builder' must be one of ('competition', 'folders', 'digits'), "
                                  "got 'csv'"),
    ("--config.ensemble.mapping=pmap", "config key 'ensemble.mapping' must be one of "
                                       "('auto', 'vmap', 'unroll', 'map'), got 'pmap'"),
    ("--config.ensemble.vote=median", "config key 'ensemble.vote' must be one of ('majority', 'soft'), "
                                      "got 'median'"),
])
def test_an_unknown_name_lists_the_tables_names_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        parse(override)
    assert str(info.value) == message


# ----------------------------------------------------------------- adding an optimizer is one entry


@pytest.fixture
def sgd_entry():
    """optax.sgd with a momentum key of its own ('heavy_ball'), registered for one test and removed after it.

    (Named 'test_sgd': the table's own 'sgd' entry, issue 15, declares 'momentum'.)
    """
    entry = optim.OptimizerEntry(
        create=lambda o, lr: optax.sgd(lr, momentum=o.heavy_ball),
        keys={"heavy_ball": 0.0},
        checks={"heavy_ball": (lambda v: 0 <= v < 1, "in [0, 1)")})
    optim.OPTIMIZERS.register("test_sgd", entry)
    try:
        yield entry
    finally:
        optim.OPTIMIZERS.unregister("test_sgd")


def tiny_model(c):
    c.model.conv_filters, c.model.conv_kernel_sizes = (4,), (3,)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("valid",), (True,), (0.0,)
    c.model.dense_units, c.model.dense_dropouts = (8,), (0.0,)
    return create_model(c.model, 3)


def two_steps(model, tx):
    """Two jitted train steps of `model` with `tx` on one device; returns the final state's params."""
    mesh = parallel.make_mesh(4, jax.local_devices()[:1])
    state = steps.create_train_state(model, tx, jax.random.key(0), 10)
    step = steps.jit_train_step(model, tx, 0.0, mesh)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(2):
        batch = {"image": rng.random((4, 10, 10, 3), dtype=np.float32),
                 "label": rng.integers(0, 3, 4).astype(np.int32),
                 "mask": np.ones(4, bool), "row": np.arange(4, dtype=np.int32)}
        state, metrics = step(state, parallel.shard_batch(batch, mesh), jax.random.key(i))
        metrics = jax.device_get(metrics)
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return jax.device_get(state.params), losses


def test_an_optimizer_added_from_a_test_is_one_entry_plus_its_keys(sgd_entry):
    base = config_lib.base_config()  # read from the table now: the new entry's key is in the schema
    assert "optimizer.heavy_ball" in set(config_lib.leaf_keys(base)) and base.optimizer.heavy_ball == 0.0
    c = parse("--config.optimizer.name=test_sgd", "--config.optimizer.heavy_ball=0.9",
              "--config.optimizer.learning_rate=0.1")
    assert (c.optimizer.name, c.optimizer.heavy_ball) == ("test_sgd", 0.9)
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.heavy_ball' \(0.9\) is not used by "
                                          r"optimizer.name='keras_adam': leave it at 0.0"):
        parse("--config.optimizer.heavy_ball=0.9")
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.heavy_ball' must be in \[0, 1\), got 1.5$"):
        parse("--config.optimizer.name=test_sgd", "--config.optimizer.heavy_ball=1.5")
    with pytest.raises(ConfigError, match=r"^config key 'optimizer.b1' \(0.5\) is not used by "
                                          r"optimizer.name='test_sgd': leave it at 0.9"):
        parse("--config.optimizer.name=test_sgd", "--config.optimizer.b1=0.5")

    model = tiny_model(c)
    tx, schedule = optim.create_optimizer(c.optimizer, steps_per_epoch=1, num_epochs=c.train.num_epochs)
    assert float(schedule(jnp.int32(5))) == pytest.approx(0.1)
    ours, losses = two_steps(model, tx)
    assert all(np.isfinite(loss) for loss in losses)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(ours))
    # The config's momentum reached the optimizer: the same as optax.sgd(0.1, momentum=0.9) by hand,
    # and not what momentum 0 gives (equal after one step, different after the second).
    direct, _ = two_steps(model, optax.sgd(0.1, momentum=0.9))
    plain, _ = two_steps(model, optax.sgd(0.1))
    jax.tree.map(np.testing.assert_array_equal, ours, direct)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)))


def test_after_unregistering_the_key_is_gone_again(sgd_entry):
    optim.OPTIMIZERS.unregister("test_sgd")
    try:
        assert "optimizer.heavy_ball" not in set(config_lib.leaf_keys(config_lib.base_config()))
        with pytest.raises(ConfigError, match="unknown config key 'optimizer.heavy_ball'"):
            parse("--config.optimizer.heavy_ball=0.9")
    finally:
        optim.OPTIMIZERS.register("test_sgd", sgd_entry)  # the fixture removes it


def test_an_entry_key_that_clashes_with_another_default_is_a_programming_error():
    optim.OPTIMIZERS.register("odd", optim.OptimizerEntry(create=lambda o, lr: optax.sgd(lr), keys={"b1": 0.5}))
    try:
        with pytest.raises(ValueError, match="key 'b1' of optimizer.name='odd' clashes"):
            config_lib.base_config()
    finally:
        optim.OPTIMIZERS.unregister("odd")


# ----------------------------------------------------------------- the other tables


def test_builder_entries_declare_the_keys_they_ignore():
    assert builders.BUILDERS.names() == ("competition", "folders", "digits")
    assert dict(builders.BUILDERS["digits"].ignored_keys)["num_classes"][0] == (0, 10)
    assert builders.BUILDERS["competition"].ignored_keys == {}
    with pytest.raises(ConfigError, match=r"'data.dir' \('/x'\) is not used by data.builder='digits' .*"
                                          r"use data.builder=competition or folders to train on a folder"):
        cli.parse_args(["--config", str(ROOT / "configs/digits.py"), "--config.data.dir=/x"])
    with pytest.raises(ConfigError, match="'data.dir' must name the data folder for data.builder='folders'"):
        parse("--config.data.builder=folders", "--config.data.dir= ")


def test_mapping_and_vote_tables_serve_the_steps_and_the_votes():
    assert mapping.resolve_mapping("auto", "gpu") == "vmap" and mapping.resolve_mapping("unroll") == "unroll"
    x = jnp.arange(6.0).reshape(3, 2)
    for name in mapping.MAPPINGS:  # every mode, 'auto' included, maps the same function the same way
        out = jax.jit(mapping.map_members(lambda a, b: a * b + 1, name, 3, (0, None)))(x, 2.0)
        np.testing.assert_array_equal(out, x * 2 + 1)
    with pytest.raises(ConfigError, match=r"'ensemble.mapping' must be one of \('auto', 'vmap', 'unroll', 'map'\)"):
        mapping.map_members(lambda a: a, "pmap", 3, (0,))
    p = np.array([[[0.6, 0.4]], [[0.3, 0.7]], [[0.45, 0.55]]])  # 2 members vote 1, soft mean (0.45, 0.55): 1
    assert voting.vote(p, "majority").tolist() == [1] and voting.vote(p, "soft").tolist() == [1]
    assert voting.VOTES["majority"] is voting.majority_vote
    with pytest.raises(ConfigError, match=r"'ensemble.vote' must be one of \('majority', 'soft'\), got 'x'"):
        voting.vote(p, "x")


def test_table_modules_do_not_import_config():
    # config imports them (inside its functions); the reverse would be a cycle.
    for module in ("optim.py", "data/builders.py", "ensemble/mapping.py", "ensemble/voting.py", "registry.py"):
        tree = ast.parse((ROOT / "imgclf_jax" / module).read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        assert "imgclf_jax.config" not in names, module
