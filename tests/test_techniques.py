"""Training techniques of issue 15 that do not touch the train state: MixUp and CutMix (the ``mixing``
section), label smoothing's config key, and the reference configs staying bit for bit what they were.

(The smoothed loss itself: tests/test_losses.py; SGDW and the schedules: tests/test_optim.py.)
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgclf_jax import batch_transforms as bt, cli, config as config_lib, losses, steps
from imgclf_jax.errors import ConfigError
from imgclf_jax.models import create_model
from imgclf_jax.optim import create_optimizer, exponential_decay, keras_adam

ROOT = pathlib.Path(__file__).resolve().parents[1]
HUGE = 1e30  # what padding rows hold here: any trace of it in a real row is a leak


def padded_batch(batch=8, real=6, size=6, classes=3, seed=0):
    """Real row i is the constant image (i + 1) / 10 (so a pasted pixel names its source); padding rows are HUGE."""
    rng = np.random.default_rng(seed)
    image = np.broadcast_to(((np.arange(batch) + 1) / 10.0)[:, None, None, None], (batch, size, size, 3)).copy()
    image[real:] = HUGE
    return {"image": jnp.asarray(image, jnp.float32), "label": jnp.asarray(rng.integers(0, classes, batch), jnp.int32),
            "mask": jnp.arange(batch) < real}


def mixed_and_draws(fn, alpha=1.0, probability=1.0, num_classes=3):
    """jit of batch, key -> (fn's batch, the draws it used): one compile for both."""
    return jax.jit(lambda batch, key: (fn(batch, key, num_classes=num_classes, alpha=alpha, probability=probability),
                                       bt._draws(key, batch, alpha, probability)))


# ----------------------------------------------------------------- the partner permutation


def test_partners_are_real_rows_one_to_one_and_padding_rows_are_their_own():
    mask = jnp.array([True, False, True, True, False, True, True, False])
    real = np.flatnonzero(np.asarray(mask))
    seen = set()
    for seed in range(20):
        perm = np.asarray(bt.partner_permutation(jax.random.key(seed), mask))
        assert sorted(perm[real].tolist()) == real.tolist()  # a bijection of the real rows
        np.testing.assert_array_equal(perm[~np.asarray(mask)], np.flatnonzero(~np.asarray(mask)))
        seen.add(tuple(perm))
    assert len(seen) > 10  # random: not one fixed pairing


# ----------------------------------------------------------------- MixUp


def test_mixup_by_hand_and_padding_never_leaks():
    batch, key = padded_batch(), jax.random.key(3)
    out, draws = mixed_and_draws(bt.mixup)(batch, key)
    lam, perm = float(draws["lam"]), np.asarray(draws["perm"])
    assert 0 < lam < 1 and bool(draws["applies"])
    x, y = np.asarray(batch["image"], np.float64), np.asarray(batch["label"])
    for i in range(6):  # real rows: lam x_i + (1 - lam) x_perm[i]; targets lam e_y_i + (1 - lam) e_y_perm[i]
        np.testing.assert_allclose(out["image"][i], lam * x[i] + (1 - lam) * x[perm[i]], rtol=1e-6)
        expected = lam * np.eye(3)[y[i]] + (1 - lam) * np.eye(3)[y[perm[i]]]
        np.testing.assert_allclose(out["targets"][i], expected, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(out["image"][:6])) <= 0.6 + 1e-6  # no HUGE in a real row
    np.testing.assert_array_equal(out["image"][6:], batch["image"][6:])  # padding stays padding
    np.testing.assert_array_equal(out["mask"], batch["mask"])
    np.testing.assert_allclose(out["targets"].sum(-1), 1.0, rtol=1e-6)


def test_probability_zero_leaves_the_batch_with_one_hot_targets():
    batch = padded_batch()
    for fn in (bt.mixup, bt.cutmix, bt.mixup_cutmix):
        out = fn(batch, jax.random.key(1), num_classes=3, alpha=1.0, probability=0.0)
        np.testing.assert_array_equal(out["image"], batch["image"])
        np.testing.assert_array_equal(out["targets"][:6], np.eye(3)[np.asarray(batch["label"])[:6]])
    keys = jax.random.split(jax.random.key(0), 400)
    applied = jax.jit(jax.vmap(lambda k: bt._draws(k, batch, 1.0, 0.3)["applies"]))(keys)
    assert 0.22 < float(np.mean(applied)) < 0.38  # per batch, with the probability (400 batches: 4 sigma)


def test_mixing_a_batch_split_over_two_devices_pairs_rows_across_the_global_batch():
    from imgclf_jax import parallel

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py forces 2 CPU devices)")
    batch, key = padded_batch(), jax.random.key(4)
    mesh = parallel.make_mesh(8, jax.devices()[:2])
    fn = jax.jit(functools.partial(bt.mixup_cutmix, num_classes=3, alpha=1.0, probability=1.0))
    split, whole = fn(parallel.shard_batch(jax.device_get(batch), mesh), key), fn(batch, key)
    perm = np.asarray(bt._draws(key, batch, 1.0, 1.0)["perm"])
    assert np.any((perm[:4] >= 4) & (perm[:4] < 6))  # a row of device 0 has a partner on device 1
    for name in ("image", "targets"):
        np.testing.assert_allclose(np.asarray(split[name]), np.asarray(whole[name]), rtol=1e-6)


# ----------------------------------------------------------------- CutMix


def test_a_cutmix_box_label_weight_is_its_area_fraction_by_hand():
    # lam 0.75: sides floor(10 * sqrt(0.25)) = 5. Centre (5, 5): rows 3..7, cols 3..7, 25 of 100 pixels = 1 - lam.
    box, weight = bt.cutmix_box(jnp.float32(0.75), jnp.int32(5), jnp.int32(5), 10, 10)
    assert float(weight) == 0.25 and int(box.sum()) == 25 and bool(box[3:8, 3:8].all())
    # Centre (1, 8): rows -1..3 clipped to 0..3 (4 rows), cols 6..10 clipped to 6..9 (4 cols): 16 pixels, 0.16.
    box, weight = bt.cutmix_box(jnp.float32(0.75), jnp.int32(1), jnp.int32(8), 10, 10)
    assert float(weight) == pytest.approx(0.16) and int(box.sum()) == 16 and bool(box[0:4, 6:10].all())
    # A non-square image: lam 0.64 -> side factor 0.6: 6 x 3 of 10 x 5, centre (0, 0): rows 0..2, cols 0..1.
    box, weight = bt.cutmix_box(jnp.float32(0.64), jnp.int32(0), jnp.int32(0), 10, 5)
    assert int(box.sum()) == int(box[0:3, 0:2].sum()) == 6 and float(weight) == pytest.approx(6 / 50)


def test_cutmix_pastes_the_partners_pixels_and_weights_labels_by_the_pasted_share():
    batch = padded_batch(size=8)
    fn = mixed_and_draws(bt.cutmix)
    weights = set()
    for seed in range(6):
        out, draws = fn(batch, jax.random.key(seed))
        perm, y = np.asarray(draws["perm"]), np.asarray(batch["label"])
        for i in range(6):
            image = np.asarray(out["image"][i, :, :, 0])
            own, other = (i + 1) / 10, (perm[i] + 1) / 10
            assert np.all(np.isclose(image, own) | np.isclose(image, other))  # each pixel is its own or the partner's
            pasted = np.mean(~np.isclose(image, own)) if perm[i] != i else None
            weight = float(bt.cutmix_box(draws["lam"], draws["centre_y"], draws["centre_x"], 8, 8)[1])
            if pasted is not None:
                assert pasted == pytest.approx(weight)  # the label weight is the exact pasted share
            expected = (1 - weight) * np.eye(3)[y[i]] + weight * np.eye(3)[y[perm[i]]]
            np.testing.assert_allclose(out["targets"][i], expected, rtol=1e-6, atol=1e-7)
            weights.add(round(weight, 6))
        assert float(jnp.max(out["image"][:6])) <= 0.6 + 1e-6  # no padding pixel in a real row
        np.testing.assert_array_equal(out["image"][6:], batch["image"][6:])
    assert len(weights) > 3


def test_mixup_cutmix_switches_per_batch():
    batch = padded_batch(size=8)
    kinds = []
    for seed in range(16):
        key = jax.random.key(seed)
        out = bt.mixup_cutmix(batch, key, num_classes=3, alpha=1.0, probability=1.0)
        draws = bt._draws(key, batch, 1.0, 1.0)
        same = bt.cutmix if bool(draws["cutmix"]) else bt.mixup
        np.testing.assert_array_equal(out["image"], same(batch, key, num_classes=3, alpha=1.0, probability=1.0)["image"])
        kinds.append(bool(draws["cutmix"]))
    assert 0 < sum(kinds) < len(kinds)


# ----------------------------------------------------------------- the config keys


def parse(*overrides):
    return cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), *overrides]).config


@pytest.mark.parametrize("overrides, message", [
    (("--config.mixing.alpha=0.4",),
     "config key 'mixing.alpha' (0.4) is not used by train.batch_transform='': leave it at 1.0, or choose an entry "
     "that uses it"),
    (("--config.mixing.probability=0.5",),
     "config key 'mixing.probability' (0.5) is not used by train.batch_transform='': leave it at 1.0"),
    (("--config.train.batch_transform=mixup", "--config.mixing.alpha=0"),
     "config key 'mixing.alpha' must be > 0, got 0.0"),
    (("--config.train.batch_transform=cutmix", "--config.mixing.probability=1.5"),
     "config key 'mixing.probability' must be in [0, 1], got 1.5"),
    (("--config.loss.label_smoothing=1.0",), "config key 'loss.label_smoothing' must be in [0, 1), got 1.0"),
])
def test_mixing_and_smoothing_keys_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        parse(*overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_recipe_hooks_bind_the_mixing_settings_and_the_smoothing():
    c = parse("--config.train.batch_transform=mixup_cutmix", "--config.mixing.alpha=0.4",
              "--config.mixing.probability=0.5", "--config.loss.label_smoothing=0.1")
    loss_fn, transform, _ = steps.recipe_hooks(c, num_classes=5)
    assert transform.func is bt.mixup_cutmix
    assert transform.keywords == {"num_classes": 5, "alpha": 0.4, "probability": 0.5}
    assert loss_fn.keywords == {"label_smoothing": 0.1}
    # A run's config.json from before the mixing section: its keys at their defaults.
    old = ml_collections.ConfigDict({"train": {"batch_transform": "cutmix"}, "loss": {"name": "softmax_cross_entropy"}})
    assert steps.recipe_hooks(old, num_classes=2)[1].keywords == {"num_classes": 2, "alpha": 1.0, "probability": 1.0}


def test_a_loss_that_does_not_read_label_smoothing_refuses_it():
    losses.LOSSES.register("plain_for_test", losses.LossEntry(
        lambda logits, batch: losses.softmax_cross_entropy(logits, batch["label"], batch["mask"]), soft_targets=True))
    try:
        with pytest.raises(ConfigError, match=r"^config key 'loss.label_smoothing' \(0.1\) is not used by "
                                              r"loss.name='plain_for_test': leave it at 0.0"):
            parse("--config.loss.name=plain_for_test", "--config.loss.label_smoothing=0.1")
        assert parse("--config.loss.name=plain_for_test").loss.name == "plain_for_test"
    finally:
        losses.LOSSES.unregister("plain_for_test")


# ----------------------------------------------------------------- reference configs: bit for bit


@pytest.mark.parametrize("name", ["ml6"])  # Keras's ExponentialDecay (the constant rate: tests/test_recipes.py)
def test_reference_configs_train_bit_for_bit_as_before_the_new_keys(name):
    """Three steps with what prepare_run builds from the config (the hooks bound to the new keys at their
    defaults, the optimizer from steps_per_epoch and num_epochs) equal the steps with the default hooks and
    the optimizer built by hand from the reference keys."""
    c = cli.parse_args(["--config", str(ROOT / f"configs/{name}.py")]).config
    c.model.conv_filters, c.model.conv_kernel_sizes = (4,), (3,)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("same",), (True,), (0.0,)
    c.model.dense_units, c.model.dense_dropouts = (8,), (0.3,)
    model, o = create_model(c.model, 3), c.optimizer
    loss_fn, transform, _ = steps.recipe_hooks(c, num_classes=3)
    assert transform is None
    tx, _ = create_optimizer(o, steps_per_epoch=391, num_epochs=c.train.num_epochs)
    lr = exponential_decay(o.learning_rate, o.decay_steps, o.decay_rate, o.staircase) \
        if o.schedule == "exponential_decay" else o.learning_rate
    by_hand = keras_adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    now = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=c.model.l2, loss_fn=loss_fn))
    before = jax.jit(functools.partial(steps.train_step, model=model, tx=by_hand, l2=c.model.l2))
    a = b = steps.create_train_state(model, tx, jax.random.key(0), 8)
    rng = np.random.default_rng(0)
    for i in range(3):
        batch = {"image": rng.random((6, 8, 8, 3), dtype=np.float32), "label": rng.integers(0, 3, 6).astype(np.int32),
                 "mask": np.arange(6) < 5}
        (a, ma), (b, mb) = now(a, batch, jax.random.key(i)), before(b, batch, jax.random.key(i))
        for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb)), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------- the start banner


def test_the_banner_names_the_techniques_that_are_on():
    from imgclf_jax import banner
    from imgclf_jax.data.splits import RunData, Split

    assert banner.recipe_line(parse()) is None  # ml1: the defaults, no line (the reference banner as it was)
    c = parse("--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.1", "--config.optimizer.nesterov=true",
              "--config.optimizer.weight_decay=5e-4", "--config.optimizer.schedule=one_cycle",
              "--config.optimizer.warmup_epochs=2", "--config.loss.label_smoothing=0.1",
              "--config.train.batch_transform=cutmix", "--config.mixing.probability=0.5")
    line = ("  recipe: optimizer 'sgd' (learning_rate 0.1, momentum 0.9, nesterov True, weight_decay 0.0005); "
            "schedule 'one_cycle' (warmup_epochs 2.0, div_factor 25.0, final_div_factor 10000.0); "
            "loss 'softmax_cross_entropy' (label_smoothing 0.1); batch transform 'cutmix' (alpha 1.0, probability 0.5)")
    assert banner.recipe_line(c) == line
    split = Split(source=None, records=np.arange(2), labels=np.array([0, 1]), image_ids=["a", "b"])
    data = RunData(class_names=["a", "b"], train=split, validation=split, test=None, fingerprint="x", sources={})
    lines = banner.start_banner(c, "runs/mine", data, 10, ["cpu:0"], "fresh run").splitlines()
    assert lines[-2:] == [line, "  workdir runs/mine: fresh run"]


# ----------------------------------------------------------------- the run's parts


def test_prepare_run_builds_the_schedule_from_the_datas_steps_per_epoch(tmp_path):
    """digits, 70 training rows, batch 32: ceil(70 / 32) = 3 updates per epoch, 3 epochs (last update: step 8);
    SGD with Nesterov and weight decay, warmup_cosine with a 1-epoch warmup, label smoothing and mixup_cutmix."""
    from imgclf_jax import loop

    c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.image_size, c.data.max_train_examples, c.data.max_val_examples = 16, 70, 30
    c.model.conv_filters, c.model.dense_units = (4,), (8,)
    for key, value in [("model.conv_kernel_sizes", (3,)), ("model.conv_paddings", ("same",)),
                       ("model.conv_pools", (True,)), ("model.conv_dropouts", (0.0,)), ("model.dense_dropouts", (0.0,))]:
        parent, name = config_lib._lookup(c, key)
        parent[name] = value
    c.train.num_epochs, c.train.batch_size = 3, 32
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.nesterov, c.optimizer.weight_decay = "sgd", 0.05, True, 5e-4
    c.optimizer.schedule, c.optimizer.warmup_epochs = "warmup_cosine", 1.0
    c.loss.label_smoothing, c.train.batch_transform, c.mixing.alpha = 0.1, "mixup_cutmix", 0.5
    config_lib.validate(c)
    parts = loop.prepare_run(c, str(tmp_path / "run"), overwrite=False)
    assert len(parts.data.train) == 70 and parts.batch_transform.keywords == {"num_classes": 10, "alpha": 0.5,
                                                                             "probability": 1.0}
    # warmup: 3 updates (1 epoch); cosine over steps 3..8: schedule(3) = peak, (1 + cos(pi / 5)) / 2 at 4, 0 at 8.
    rates = [float(parts.schedule(jnp.int32(s))) for s in (0, 1, 3, 4, 8)]
    assert rates == pytest.approx([0.0, 0.05 / 3, 0.05, 0.05 * (1 + np.cos(np.pi / 5)) / 2, 0.0], abs=1e-8)


def test_resuming_with_another_length_is_refused_when_the_schedule_depends_on_it(tmp_path):
    from imgclf_jax import report, workdir

    c = parse("--config.optimizer.schedule=one_cycle", "--config.optimizer.warmup_epochs=1")
    report.write_json(str(tmp_path / "config.json"), c.to_dict())
    workdir.check_workdir(str(tmp_path), c, overwrite=False)  # the same config: resumes
    longer = parse("--config.optimizer.schedule=one_cycle", "--config.optimizer.warmup_epochs=1",
                   "--config.train.num_epochs=20")
    with pytest.raises(ConfigError) as info:
        workdir.check_workdir(str(tmp_path), longer, overwrite=False)
    assert str(info.value) == (
        f"workdir '{tmp_path}' holds a run of train.num_epochs=10, and optimizer.schedule='one_cycle' sets its "
        "rates by the run's length: its updates so far followed the 10-epoch schedule, so train.num_epochs=20 "
        "cannot continue it; keep train.num_epochs=10, use another --workdir, or --overwrite to start again")
    report.write_json(str(tmp_path / "config.json"), parse().to_dict())  # ml1: a constant rate
    workdir.check_workdir(str(tmp_path), parse("--config.train.num_epochs=20"), overwrite=False)  # trains further
