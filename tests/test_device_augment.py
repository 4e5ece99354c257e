"""Augmentation on the device (data.augment_on='device') and the split in device memory (data.on_device).

The device warp is checked against scipy.ndimage.affine_transform on real competition images;
the pipelines' batches against the host path's for the same seed.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

from imgclf_jax import config as config_lib, loop, memory, parallel
from imgclf_jax.data import augment, device_augment, device_ops, pipeline, placement, splits
from imgclf_jax.data.augment import AUGMENT_OPS, AugmentOp, AugmentParams
from imgclf_jax.errors import ConfigError

from conftest import data_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Largest |device - scipy| seen on the real images below, in units of 0..255 pixel values (the float32 source
# coordinates against scipy's float64 ones); README's "Augmentation on the device" quotes the measurement.
WARP_TOLERANCE = 0.01


def ml6_config(root, cache_dir, **data_changes):
    c = config_lib.load_config_file(str(ROOT / "configs" / "ml6.py"))
    c.data = data_config("competition", root, cache_dir, image_size=c.data.image_size,
                         class_repeats=c.data.class_repeats, **data_changes)
    c.train.batch_size = 24
    c.train.num_epochs = 2
    return c


@pytest.fixture(scope="module")
def real_train(small_competition, tmp_path_factory):
    """(config, training split) of 40 real images at ml6's recipe (128x128, rotation, shift, zoom, flip)."""
    c = ml6_config(small_competition, tmp_path_factory.mktemp("cache"))
    return c, splits.load_run_data(c.data).train


def real_images(split, count: int) -> list[np.ndarray]:
    return [np.asarray(split.source[int(r)]["image"], np.float32) for r in split.records[:count]]


def test_device_warp_matches_scipy_affine_transform_on_real_images(real_train):
    """Keras's matrices as ml6 draws them, applied to 12 real 100x100 images: scipy vs the jitted JAX warp."""
    config, split = real_train
    params = AugmentParams(**config.augment.to_dict())
    entry, settings = params.steps[0]
    assert entry is AUGMENT_OPS["keras_affine"]
    warp = jax.jit(lambda image, m: device_ops.keras_affine(image, m, settings))
    worst = 0.0
    for k, image in enumerate(real_images(split, 12)):
        drawn = augment.draw_keras_affine(np.random.default_rng(k), settings, *image.shape[:2])
        matrix = np.vstack([drawn.reshape(2, 3), [0.0, 0.0, 1.0]])
        expected = np.stack([ndi.affine_transform(image[..., c], matrix[:2, :2], matrix[:2, 2], order=1,
                                                  mode="nearest", prefilter=False) for c in range(3)], -1)
        got = np.asarray(warp(image, drawn.astype(np.float32)))
        assert not np.allclose(expected, image)  # a real warp, not the identity
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= WARP_TOLERANCE, worst


@pytest.mark.parametrize("mode", augment.CROP_PADDING_MODES)
def test_device_crop_and_flip_are_exact(mode):
    image = np.random.default_rng(0).integers(0, 256, (9, 7, 3)).astype(np.float32)
    settings = {"crop_padding": 3, "crop_padding_mode": mode}
    for seed in range(6):
        offset = augment.draw_random_crop(np.random.default_rng(seed), settings, 9, 7)
        np.testing.assert_array_equal(np.asarray(device_ops.random_crop(image, offset.astype(np.float32), settings)),
                                      augment.apply_random_crop(image, offset, settings))
    for flip in (0.0, 1.0):
        np.testing.assert_array_equal(np.asarray(device_ops.horizontal_flip(image, np.float32([flip]), {})),
                                      image[:, ::-1] if flip else image)


def test_draws_are_the_host_ops_draws():
    """The parameters drawn for the device reproduce the host ops' result when applied on the host (to the
    float32 rounding of the matrix): the same numbers from the same generator, in the same order."""
    params = AugmentParams(ops=("keras_affine", "random_crop", "horizontal_flip"), rotation_deg=15.0,
                           shift_fraction=0.1, zoom_fraction=0.2, crop_padding=2, horizontal_flip=True)
    image = np.random.default_rng(1).integers(0, 256, (12, 10, 3)).astype(np.uint8)
    for seed in range(8):
        host = augment.random_augment(image, np.random.default_rng(seed), params)
        drawn = params.draw(np.random.default_rng(seed), 12, 10)
        assert drawn.shape == (params.num_params,) == (9,)
        out, offset = image.astype(np.float32), 0
        for entry, settings in params.steps:
            out = entry.apply.apply_drawn(out, drawn[offset:offset + entry.num_params].astype(np.float64), settings)
            offset += entry.num_params
        np.testing.assert_allclose(out, host, atol=2e-3)  # the matrix went through float32


def _close_batches(device_batch, host_batch):
    device_batch = jax.device_get(device_batch)
    assert set(device_batch) == set(host_batch)
    for key in ("label", "mask", "row"):
        np.testing.assert_array_equal(device_batch[key], host_batch[key])
    assert device_batch["image"].dtype == np.float32 and device_batch["image"].shape == host_batch["image"].shape
    return float(np.abs(device_batch["image"] - host_batch["image"]).max())


def test_device_batches_equal_the_host_batches_for_the_same_seed(real_train):
    """ml6's pipeline on 40 real images (each row twice: 80 rows, batches of 24, a padded last batch), both ways."""
    config, split = real_train
    host = pipeline.train_pipeline(split, config, augment_on="host")
    device = pipeline.train_pipeline(split, config, augment_on="device")
    table = pipeline.train_pipeline(split, config, augment_on="device", on_device=True)
    assert device.steps_per_epoch == host.steps_per_epoch == 4
    mesh = parallel.make_mesh(config.train.batch_size)
    stage = device_augment.stage_for(device, split, config, mesh)
    table_stage = device_augment.stage_for(table, split, config, mesh)
    assert "image" not in table.dataset[0] and table.dataset[0]["aug"].shape == (24, 7)
    worst = 0.0
    for j in (0, 3, 4, 7):  # first and padded last batch of both epochs
        expected = host.dataset[j]
        worst = max(worst, _close_batches(stage(parallel.shard_batch(device.dataset[j], mesh)), expected))
        worst = max(worst, _close_batches(table_stage(parallel.shard_batch(table.dataset[j], mesh)), expected))
    assert (~host.dataset[3]["mask"]).sum() == 16  # the padded rows were compared too
    assert worst <= WARP_TOLERANCE / 255, worst * 255


def test_ensemble_batches_on_the_device_equal_the_host_ones(real_train):
    config, split = real_train
    config = config.copy_and_resolve_references()
    config.data.channel_mean, config.data.channel_std = (0.5, 0.4, 0.45), (0.25, 0.2, 0.3)
    host = pipeline.ensemble_train_pipeline(split, config, [3, 4], augment_on="host")
    device = pipeline.ensemble_train_pipeline(split, config, [3, 4], augment_on="device", on_device=True)
    mesh = parallel.make_mesh(config.train.batch_size)
    stage = device_augment.stage_for(device, split, config, mesh, members=True)
    batch = parallel.shard_batch(device.dataset[1], mesh, members=True)
    assert _close_batches(stage(batch), host.dataset[1]) <= WARP_TOLERANCE / 255 / 0.2  # / the smallest std


def test_resolve_per_backend_and_refusals():
    data = config_lib.base_config().data
    assert placement.resolve(data, "cpu") == "host" and placement.resolve(data, "gpu") == "device"
    data.on_device = True
    assert placement.resolve(data, "cpu") == "device"
    data.augment_on = "host"
    with pytest.raises(ConfigError, match="data.on_device"):
        placement.resolve(data, "gpu")
    c = config_lib.base_config()
    c.data.builder, c.data.dir = "digits", ""
    c.data.on_device = True
    c.data.augment_on = "host"
    with pytest.raises(ConfigError, match="data.augment_on"):
        config_lib.validate(c)


def test_a_host_only_op_is_refused_on_the_device_and_keeps_auto_on_the_host():
    def vertical_flip(image, rng, settings):
        return image[::-1] if rng.random() < 0.5 else image

    AUGMENT_OPS.register("test_vertical_flip", AugmentOp({"test_vertical_flip": False}, vertical_flip))
    try:
        c = config_lib.base_config()
        c.data.builder, c.data.dir = "digits", ""
        c.augment.ops = ("keras_affine", "horizontal_flip", "test_vertical_flip")
        c.augment.test_vertical_flip = True
        config_lib.validate(c)  # 'auto' is fine: it stays on the host
        recipe = AugmentParams(**c.augment.to_dict())
        assert recipe.host_only_ops() == ["test_vertical_flip"]
        assert placement.resolve(c.data, "gpu", recipe) == "host"
        c.data.augment_on = "device"
        with pytest.raises(ConfigError, match="host-only op.*test_vertical_flip"):
            config_lib.validate(c)
    finally:
        AUGMENT_OPS.unregister("test_vertical_flip")


def test_a_drawn_op_of_ones_own_runs_on_the_device_with_the_host_draws(real_train):
    """README's Extending example: a vertical flip registered with drawn_op gives the same batches both ways."""
    import jax.numpy as jnp

    def draw(rng, settings, height, width):
        return np.array([1.0 if rng.random() < 0.5 else 0.0])

    def apply(image, params, settings):
        return image[::-1] if params[0] else image

    def on_device(image, params, settings):
        return jnp.where(params[0] > 0.5, image[::-1], image)

    AUGMENT_OPS.register("test_vflip", augment.drawn_op({"test_vflip": False}, draw, 1, apply, on_device))
    try:
        config, split = real_train
        config = config.copy_and_resolve_references()
        config.augment.ops = ("keras_affine", "test_vflip", "horizontal_flip")
        config.augment.test_vflip = True
        config_lib.validate(config)
        recipe = AugmentParams(**config.augment.to_dict())
        assert recipe.num_params == 6 + 1 + 1 and recipe.host_only_ops() == []
        assert placement.resolve(config.data, "gpu", recipe) == "device"
        host = pipeline.train_pipeline(split, config, augment_on="host")
        device = pipeline.train_pipeline(split, config, augment_on="device")
        flips = np.concatenate([device.dataset[j]["aug"][:, 6] for j in range(device.steps_per_epoch)])
        assert 0 < flips.sum() < len(flips)  # some images flipped vertically, some not
        mesh = parallel.make_mesh(config.train.batch_size)
        stage = device_augment.stage_for(device, split, config, mesh)
        for j in (0, 1):
            worst = _close_batches(stage(parallel.shard_batch(device.dataset[j], mesh)), host.dataset[j])
            assert worst <= WARP_TOLERANCE / 255, worst * 255
    finally:
        AUGMENT_OPS.unregister("test_vflip")


def test_memory_check_counts_the_split_on_the_device():
    member = memory.MemberMemory(params=10, opt_state=20, temp=30, batch=8, model_keys=("conv_filters",))
    free, _ = memory.available_bytes(jax.local_devices()[:1])
    assert memory.check_fits(member, 1, False, jax.local_devices()[:1], data_bytes=1000)["need_bytes"] == 1060
    with pytest.raises(ConfigError, match="data.on_device=true puts the training split on every device"):
        memory.check_fits(member, 1, False, jax.local_devices()[:1], data_bytes=free)
    assert device_augment.table_bytes(12_500, 128) == 12_500 * 128 * 128 * 3


def test_digits_trains_the_same_with_device_augmentation(tmp_path):
    """The whole digits set, 2 epochs: augmentation on the host vs on the device with the split there."""
    summaries = {}
    for name, changes in (("host", {"augment_on": "host"}), ("device", {"on_device": True})):
        c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
        c.data.cache_dir = str(tmp_path / "cache")
        c.train.num_epochs = 2
        for key, value in changes.items():
            c.data[key] = value
        summaries[name] = loop.train_and_evaluate(c, str(tmp_path / name))
    host, device = summaries["host"], summaries["device"]
    assert (host["augment_on"], host["data_on_device"]) == ("host", False)
    assert (device["augment_on"], device["data_on_device"]) == ("device", True)
    assert host["best_val_accuracy"] > 0.8
    assert abs(device["best_val_accuracy"] - host["best_val_accuracy"]) <= 0.01, (host, device)
