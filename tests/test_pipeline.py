"""The grain pipeline: resampling, per-epoch shuffles, masks, determinism, resizing."""

import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

from imgclf_jax import config as config_lib
from imgclf_jax.data import builders, pipeline, splits


def fake_split(labels, size=6):
    """A split over an in-memory source; record i's pixels all equal i (so rows are recoverable)."""
    labels = np.asarray(labels, dtype=np.int64)
    source = [{"image": np.full((size, size, 3), i, np.uint8), "label": int(y)} for i, y in enumerate(labels)]
    return splits.Split(source=source, records=np.arange(len(labels)), labels=labels,
                        image_ids=[f"id{i}" for i in range(len(labels))])


def make_config(batch_size=4, image_size=6, class_repeats=(), seed=0, **augment):
    c = config_lib.base_config()
    c.train.batch_size, c.seed = batch_size, seed
    c.data.image_size, c.data.class_repeats = image_size, tuple(class_repeats)
    for key, value in augment.items():
        c.augment[key] = value
    return c


def test_every_epoch_is_a_fresh_permutation_of_the_resampled_rows():
    labels = [0, 1, 2, 3, 4, 4, 0, 1, 2, 3, 4]
    config = make_config(batch_size=4, class_repeats=(2, 2, 2, 2, 3))
    train = pipeline.train_pipeline(fake_split(labels), config, num_epochs=3)
    expected = np.repeat(np.arange(11), [3 if y == 4 else 2 for y in labels])
    assert train.epoch_size == len(expected) == 25 and train.steps_per_epoch == math.ceil(25 / 4)
    orders = []
    for epoch in range(3):
        rows = np.concatenate([b["row"][b["mask"]] for b in train.epoch(epoch)])
        np.testing.assert_array_equal(np.sort(rows), expected)  # each row exactly its factor
        np.testing.assert_array_equal(rows, train.epoch_rows(epoch))
        counts = np.bincount(np.asarray(labels)[rows], minlength=5)
        assert counts.tolist() == [4, 4, 4, 4, 9]
        orders.append(rows)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_mask_and_epoch_length():
    config = make_config(batch_size=4)
    train = pipeline.train_pipeline(fake_split([0, 1] * 5), config, num_epochs=2)
    assert train.steps_per_epoch == 3 and len(train.dataset) == 6
    batches = list(train.epoch(0))
    assert len(batches) == 3
    for b in batches:  # fixed shapes, even for the short batch
        assert b["image"].shape == (4, 6, 6, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
    assert [b["mask"].tolist() for b in batches][-1] == [True, True, False, False]
    last = batches[-1]
    assert last["row"].tolist()[2:] == [-1, -1] and not last["image"][2:].any()
    # Pixels identify rows (value i / 255 for record i) and labels follow them.
    for b in batches:
        real = b["row"][b["mask"]]
        np.testing.assert_allclose(b["image"][b["mask"]][:, 0, 0, 0], real / 255.0, rtol=1e-6)
        assert b["label"][b["mask"]].tolist() == [int(r % 2) for r in real]


def test_eval_batches_keep_order_and_pad():
    config = make_config(batch_size=4)
    batches = list(pipeline.iterate(pipeline.eval_dataset(fake_split([3, 1, 2, 0, 4, 1]), config), 0))
    assert len(batches) == 2
    assert np.concatenate([b["row"] for b in batches]).tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert np.concatenate([b["label"][b["mask"]] for b in batches]).tolist() == [3, 1, 2, 0, 4, 1]


def batches_of(config, workers, labels, steps=None):
    config.data.num_workers = workers
    train = pipeline.train_pipeline(fake_split(labels, size=12), config, num_epochs=2)
    return list(train.batches(0, steps))


def test_same_seed_same_batches_whatever_the_worker_count():
    labels = [0, 1, 2] * 7
    config = make_config(batch_size=5, image_size=12, rotation_deg=20.0, shift_fraction=0.2,
                         zoom_fraction=0.3, horizontal_flip=True)
    reference = batches_of(config, 0, labels)
    with_workers = batches_of(config.copy_and_resolve_references(), 2, labels)
    assert len(reference) == len(with_workers) == 10
    for a, b in zip(reference, with_workers):
        for key in ("image", "label", "mask", "row"):
            np.testing.assert_array_equal(a[key], b[key])
    other = batches_of(make_config(batch_size=5, image_size=12, seed=1, rotation_deg=20.0), 0, labels)
    assert not np.array_equal(reference[0]["row"], other[0]["row"])
    # Resuming mid-run yields the same batches as running through.
    config.data.num_workers = 0
    train = pipeline.train_pipeline(fake_split(labels, size=12), config, num_epochs=2)
    resumed = list(train.batches(3, 7))
    for a, b in zip(reference[3:7], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])


class CountingSource(list):
    """A list source that counts reads (grain reads records by index)."""

    reads = 0

    def __getitem__(self, index):
        CountingSource.reads += 1
        return super().__getitem__(index)


def test_ensemble_batches_are_each_seeds_batches_and_a_repeated_seed_is_loaded_once():
    labels = [0, 1, 2] * 4
    config = make_config(batch_size=4, image_size=12, rotation_deg=20.0, horizontal_flip=True)
    split = fake_split(labels, size=12)
    split.source = CountingSource(split.source)
    seeds = [5, 6, 5, 6, 5, 6]  # a population: 3 combinations x seeds 5, 6
    stacked = list(pipeline.ensemble_train_pipeline(split, config, seeds, num_epochs=1).epoch(0))
    reads, CountingSource.reads = CountingSource.reads, 0
    assert reads == 2 * len(labels)  # two distinct seeds, each row once (not six streams)
    for i, seed in enumerate(seeds):
        alone = list(pipeline.train_pipeline(split, config, num_epochs=1, seed=seed).epoch(0))
        assert len(alone) == len(stacked) == 3
        for a, b in zip(alone, stacked):
            for key in ("image", "label", "mask", "row"):
                np.testing.assert_array_equal(a[key], b[key][i])
    assert not np.array_equal(stacked[0]["row"][0], stacked[0]["row"][1])  # the seeds differ


def test_augmentation_differs_between_epochs_and_stays_in_range():
    config = make_config(batch_size=2, image_size=12, rotation_deg=20.0, shift_fraction=0.2)
    labels = [0, 1]
    split = fake_split(labels, size=12)
    # Make records non-uniform so a warp changes them.
    split.source[0]["image"] = np.tile(np.arange(12, dtype=np.uint8)[None, :, None] * 20, (12, 1, 3))
    split.source[1]["image"] = split.source[0]["image"].transpose(1, 0, 2).copy()
    train = pipeline.train_pipeline(split, config, num_epochs=2)
    e0, e1 = list(train.epoch(0))[0], list(train.epoch(1))[0]
    img0 = e0["image"][e0["row"] == 0][0]
    img1 = e1["image"][e1["row"] == 0][0]
    assert not np.array_equal(img0, img1)
    assert 0.0 <= img0.min() and img0.max() <= 1.0


def test_real_images_resized_nearest_and_no_validation_row_in_training(small_competition, cache_dir):
    c = config_lib.base_config()
    c.data.dir, c.data.cache_dir = str(small_competition), cache_dir
    c.data.class_repeats = (2, 2, 2, 2, 3)
    c.train.batch_size = 16
    data = splits.load_run_data(c.data)
    train = pipeline.train_pipeline(data.train, c, num_epochs=1)
    batches = list(train.epoch(0))
    rows = np.concatenate([b["row"][b["mask"]] for b in batches])
    train_ids = {data.train.image_ids[r] for r in rows}
    assert train_ids == set(data.train.image_ids)
    assert not train_ids & set(data.validation.image_ids)
    assert len(rows) == 8 * 4 * 2 + 8 * 3 and len(batches) == math.ceil(len(rows) / 16)
    first = batches[0]
    record = data.train.source[int(data.train.records[first["row"][0]])]
    expected = np.asarray(Image.fromarray(record["image"]).resize((128, 128), Image.Resampling.NEAREST))
    np.testing.assert_allclose(first["image"][0], expected / 255.0, rtol=1e-6)
    assert first["image"].shape == (16, 128, 128, 3)


# ----------------------------------------------------------------- native size and normalization


def test_native_size_keeps_the_files_pixels_exactly(small_competition, cache_dir):
    from conftest import find_image

    from imgclf_jax.data.imageio import load_rgb

    c = config_lib.base_config()
    c.data.dir, c.data.cache_dir, c.data.image_size = str(small_competition), cache_dir, 100
    c.augment.ops, c.train.batch_size = (), 5
    data = splits.load_run_data(c.data)
    batch = next(iter(pipeline.iterate(pipeline.eval_dataset(data.validation, c), 0)))
    train = next(iter(pipeline.train_pipeline(data.train, c, num_epochs=1).batches(0, 1)))
    for images, split, folder, rows in ((batch["image"], data.validation, "validation", batch["row"]),
                                        (train["image"], data.train, "train", train["row"])):
        assert images.shape == (5, 100, 100, 3)
        for image, row in zip(images, rows):
            pixels = load_rgb(find_image(small_competition / folder, split.image_ids[row]))
            assert pixels.shape == (100, 100, 3)  # the competition's size: nothing resampled
            np.testing.assert_array_equal(image, pixels.astype(np.float32) * np.float32(1 / 255))


def test_per_channel_normalization_by_hand_in_training_and_evaluation():
    config = make_config(batch_size=4, image_size=6)
    config.augment.ops = ()
    config.data.channel_mean, config.data.channel_std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    config_lib.check_normalization(config.data)
    split = fake_split([0] * 52 + [1], size=6)  # record i's pixels all equal i; row 51: 51 / 255 = 0.2
    evals = list(pipeline.iterate(pipeline.eval_dataset(split, config, batch_size=4), 0))
    row51 = evals[12]["image"][3]
    # (0.2 - 0.1) / 0.5 = 0.2, (0.2 - 0.2) / 0.25 = 0, (0.2 - 0.3) / 2 = -0.05 in every pixel.
    np.testing.assert_allclose(row51, np.broadcast_to([0.2, 0.0, -0.05], (6, 6, 3)), atol=1e-6)
    # Row 0 (x = 0) and the padding rows of the last batch: (0 - mean) / std = (-0.2, -0.8, -0.15).
    np.testing.assert_allclose(evals[0]["image"][0], np.broadcast_to([-0.2, -0.8, -0.15], (6, 6, 3)), atol=1e-6)
    assert not evals[13]["mask"][1:].any()
    np.testing.assert_allclose(evals[13]["image"][1:, 0, 0], [[-0.2, -0.8, -0.15]] * 3, atol=1e-6)
    train = pipeline.train_pipeline(split, config, num_epochs=1)
    for b in train.batches():
        real = b["row"][b["mask"]]
        expected = (real[:, None] / 255.0 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
        np.testing.assert_allclose(b["image"][b["mask"]][:, 2, 3], expected, rtol=1e-5, atol=1e-6)
    # predict reads the keys from the run's config.json (tuples come back as lists): the same values.
    import json

    saved = ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))
    for a, b in zip(pipeline.normalization(saved.data), pipeline.normalization(config.data)):
        np.testing.assert_array_equal(a, b)
    # Off (the default, or a run's config.json from before the keys): x / 255 exactly, as before.
    plain = make_config(batch_size=4, image_size=6)
    assert pipeline.normalization(plain.data) is None
    assert pipeline.normalization(ml_collections.ConfigDict({"image_size": 6})) is None
    first = next(iter(pipeline.iterate(pipeline.eval_dataset(split, plain, batch_size=4), 0)))
    np.testing.assert_array_equal(first["image"][3], np.full((6, 6, 3), np.float32(3) * np.float32(1 / 255)))


def test_process_shares_of_a_batch_are_its_blocks_augmented_as_in_one_process():
    """2 processes' shares of global batch j, in process order, are the single-process batch j, pixels included
    (augmentation is seeded by a row's global position); the epoch's last short batch and eval padding too."""
    labels = [0, 1, 2] * 5  # 15 rows, batches of 4: the last one of each epoch padded
    config = make_config(batch_size=4, image_size=12, seed=3, rotation_deg=20.0, horizontal_flip=True)
    split = fake_split(labels, size=12)
    whole = list(pipeline.train_pipeline(split, config, num_epochs=2).batches())
    shares = [list(pipeline.train_pipeline(split, config, num_epochs=2, shard=(p, 2)).batches()) for p in (0, 1)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 8
    for j, batch in enumerate(whole):
        assert shares[0][j]["image"].shape[0] == 2
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([shares[0][j][key], shares[1][j][key]]), batch[key])
    assert not whole[3]["mask"][-1] and not shares[1][3]["mask"][-1]  # the padded slot is process 1's
    evals = [list(pipeline.iterate(pipeline.eval_dataset(split, config, shard=(p, 2)), 0)) for p in (0, 1)]
    rows = np.concatenate([np.concatenate([evals[0][j]["row"], evals[1][j]["row"]]) for j in range(4)])
    assert rows.tolist() == list(range(15)) + [-1]
    with pytest.raises(ValueError, match="multiple of 3 processes"):
        pipeline.train_pipeline(split, config, num_epochs=1, shard=(0, 3))
