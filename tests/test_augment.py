"""Augmentation against hand-computed pixels."""

import numpy as np
import pytest

from imgclf_jax.data.augment import AUGMENT_OPS, AugmentOp, AugmentParams, affine_matrix, random_augment, warp
from imgclf_jax.errors import ConfigError


def ramp_image(h=6, w=6):
    r, c = np.mgrid[0:h, 0:w]
    return np.dstack([r * 10 + c, 100 + r, 200 - c]).astype(np.float32)


def test_identity_at_zero_ranges():
    image = (np.random.default_rng(0).integers(0, 256, (9, 7, 3))).astype(np.uint8)
    out = random_augment(image, np.random.default_rng(1), AugmentParams())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image.astype(np.float32))
    np.testing.assert_allclose(affine_matrix(0, 0, 0, 1, 1, 9, 7), np.eye(3), atol=1e-12)


def test_exact_horizontal_flip():
    image = (np.random.default_rng(0).integers(0, 256, (5, 8, 3))).astype(np.uint8)
    params = AugmentParams(horizontal_flip=True)
    outcomes = set()
    for seed in range(20):
        flipped = np.random.default_rng(seed).random() < 0.5
        out = random_augment(image, np.random.default_rng(seed), params)
        expected = image[:, ::-1] if flipped else image
        np.testing.assert_array_equal(out, expected.astype(np.float32))
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_pure_shift_replicates_the_edge():
    image = ramp_image()
    out = warp(image, affine_matrix(0, 2, -1, 1, 1, 6, 6))  # source = (row + 2, col - 1)
    for r in range(6):
        for c in range(6):
            src = image[min(r + 2, 5), max(c - 1, 0)]
            np.testing.assert_allclose(out[r, c], src, atol=1e-4)


def test_pure_rotation_by_90_degrees_about_the_centre():
    image = ramp_image()
    out = warp(image, affine_matrix(90, 0, 0, 1, 1, 6, 6))
    # source = C + R (dst - C), R = [[0, -1], [1, 0]], C = 2.5: src_row = 5 - col, src_col = row.
    expected = np.array([[image[5 - c, r] for c in range(6)] for r in range(6)])
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_rotation_by_30_degrees_samples_bilinearly():
    image = ramp_image()
    out = warp(image, affine_matrix(30, 0, 0, 1, 1, 6, 6))
    cos, sin = np.cos(np.pi / 6), np.sin(np.pi / 6)
    r, c = 1, 3  # hand: src = (2.5 + cos*(-1.5) - sin*(0.5), 2.5 + sin*(-1.5) + cos*(0.5))
    sr, sc = 2.5 + cos * (r - 2.5) - sin * (c - 2.5), 2.5 + sin * (r - 2.5) + cos * (c - 2.5)
    r0, c0 = int(np.floor(sr)), int(np.floor(sc))
    fr, fc = sr - r0, sc - c0
    expected = ((1 - fr) * (1 - fc) * image[r0, c0] + (1 - fr) * fc * image[r0, c0 + 1]
                + fr * (1 - fc) * image[r0 + 1, c0] + fr * fc * image[r0 + 1, c0 + 1])
    np.testing.assert_allclose(out[r, c], expected, atol=1e-3)


def test_zoom_above_one_zooms_out():
    image = ramp_image(7, 7)
    out = warp(image, affine_matrix(0, 0, 0, 2.0, 1.0, 7, 7))  # rows: source = 3 + 2 (row - 3)
    np.testing.assert_allclose(out[2], image[1], atol=1e-4)
    np.testing.assert_allclose(out[3], image[3], atol=1e-4)
    np.testing.assert_allclose(out[0], image[0], atol=1e-4)  # -3 -> clamped to the edge row


@pytest.mark.parametrize("seed", range(5))
def test_dtype_range_and_determinism(seed):
    image = (np.random.default_rng(seed).integers(0, 256, (32, 32, 3))).astype(np.uint8)
    params = AugmentParams(rotation_deg=20, shift_fraction=0.2, zoom_fraction=0.3, horizontal_flip=True)
    out = random_augment(image, np.random.default_rng(seed), params)
    again = random_augment(image, np.random.default_rng(seed), params)
    assert out.dtype == np.float32 and out.shape == (32, 32, 3)
    assert out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, image.astype(np.float32))


# ----------------------------------------------------------------- ops in order (issue 14)


def random_augment_before_issue14(image, rng, rotation_deg=0.0, shift_fraction=0.0, zoom_fraction=0.0,
                                  horizontal_flip=False):
    """random_augment as it was before augmentation became a list of ops (copied verbatim)."""
    out = image.astype(np.float32)
    height, width = out.shape[:2]
    if rotation_deg or shift_fraction or zoom_fraction:
        r, s, z = rotation_deg, shift_fraction, zoom_fraction
        theta = rng.uniform(-r, r) if r else 0.0
        shift_rows = rng.uniform(-s, s) * height if s else 0.0
        shift_cols = rng.uniform(-s, s) * width if s else 0.0
        zoom_rows, zoom_cols = rng.uniform(1 - z, 1 + z, 2) if z else (1.0, 1.0)
        matrix = affine_matrix(theta, shift_rows, shift_cols, zoom_rows, zoom_cols, height, width)
        out = warp(out, matrix)
    if horizontal_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


RANGES = [dict(rotation_deg=r, shift_fraction=s, zoom_fraction=z, horizontal_flip=f)
          for r in (0.0, 20.0) for s in (0.0, 0.2) for z in (0.0, 0.3) for f in (False, True)]


@pytest.mark.parametrize("ranges", RANGES, ids=lambda r: "-".join(k for k, v in r.items() if v) or "off")
def test_default_ops_reproduce_the_keras_recipe_pixels_and_draws(ranges):
    params = AugmentParams(**ranges)  # ops default: ('keras_affine', 'horizontal_flip')
    assert params.ops == ("keras_affine", "horizontal_flip")
    assert params.active == any(ranges.values())
    for seed in range(4):
        image = np.random.default_rng(100 + seed).integers(0, 256, (11, 9, 3)).astype(np.uint8)
        rng_old, rng_new = np.random.default_rng(seed), np.random.default_rng(seed)
        old = random_augment_before_issue14(image, rng_old, **ranges)
        new = random_augment(image, rng_new, params)
        assert new.dtype == np.float32 and new.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(new, old)
        # The same number of draws: both generators are left in the same state.
        assert rng_new.bit_generator.state == rng_old.bit_generator.state


def test_flip_before_the_warp_is_a_different_and_correct_recipe():
    ranges = dict(rotation_deg=30.0, shift_fraction=0.2, zoom_fraction=0.0, horizontal_flip=True)
    reordered = AugmentParams(ops=("horizontal_flip", "keras_affine"), **ranges)
    default = AugmentParams(**ranges)
    image = np.random.default_rng(7).integers(0, 256, (10, 10, 3)).astype(np.uint8)
    differs = 0
    for seed in range(6):
        out = random_augment(image, np.random.default_rng(seed), reordered)
        # By hand: the flip draws first, then the warp draws theta and the two shifts.
        rng = np.random.default_rng(seed)
        flipped = image.astype(np.float32)[:, ::-1] if rng.random() < 0.5 else image.astype(np.float32)
        theta, shift_rows, shift_cols = rng.uniform(-30, 30), rng.uniform(-0.2, 0.2) * 10, rng.uniform(-0.2, 0.2) * 10
        expected = warp(flipped, affine_matrix(theta, shift_rows, shift_cols, 1.0, 1.0, 10, 10))
        np.testing.assert_array_equal(out, expected)
        differs += not np.array_equal(out, random_augment(image, np.random.default_rng(seed), default))
    assert differs == 6  # other draws for the same seed: never the default's pixels here


def test_an_op_not_listed_is_off_and_its_keys_must_stay_at_their_defaults():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    only_flip = AugmentParams(ops=("horizontal_flip",), horizontal_flip=True)
    rng = np.random.default_rng(3)
    out = random_augment(image, rng, only_flip)
    expected = image[:, ::-1] if np.random.default_rng(3).random() < 0.5 else image
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    assert not AugmentParams(ops=()).active
    with pytest.raises(ConfigError, match=r"^config key 'augment.rotation_deg' \(5.0\) belongs to op "
                                          r"'keras_affine', which augment.ops \(horizontal_flip\) does not list"):
        AugmentParams(ops=("horizontal_flip",), rotation_deg=5.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ops=("keras_affine", "sharpen")),
     "config key 'augment.ops' must be one of ('keras_affine', 'horizontal_flip', 'random_crop'), got 'sharpen'"),
    (dict(ops=("horizontal_flip", "keras_affine", "horizontal_flip")),
     "config key 'augment.ops' lists 'horizontal_flip' twice (horizontal_flip, keras_affine, horizontal_flip): "
     "each op runs at most once"),
    (dict(rotaton_deg=3.0), "unknown config key 'augment.rotaton_deg'; valid keys in 'augment': ops, "
                            "rotation_deg, shift_fraction, zoom_fraction, horizontal_flip, crop_padding, "
                            "crop_padding_mode"),
    (dict(rotation_deg=-1.0), "config key 'augment.rotation_deg' must be >= 0 degrees, got -1.0"),
    (dict(shift_fraction=1.0), "config key 'augment.shift_fraction' must be in [0, 1), got 1.0"),
    (dict(zoom_fraction=-0.1), "config key 'augment.zoom_fraction' must be in [0, 1), got -0.1"),
    (dict(ops=("random_crop",), crop_padding=-1),
     "config key 'augment.crop_padding' must be an int >= 0 pixels (0 = off), got -1"),
    (dict(ops=("random_crop",), crop_padding=2, crop_padding_mode="wrap"),
     "config key 'augment.crop_padding_mode' must be one of ('reflect', 'edge', 'constant'), got 'wrap'"),
    (dict(ops=("random_crop",), crop_padding_mode="edge"),
     "config key 'augment.crop_padding_mode' ('edge') is not used while augment.crop_padding is 0 (no crop): "
     "set augment.crop_padding > 0 or leave the mode at 'reflect'"),
    (dict(crop_padding=4), "config key 'augment.crop_padding' (4) belongs to op 'random_crop', which augment.ops "
                           "(keras_affine, horizontal_flip) does not list: add the op or leave the key at 0"),
])
def test_bad_recipes_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as info:
        AugmentParams(**kwargs)
    assert str(info.value) == message and "\n" not in message


def test_a_registered_op_gets_its_key_in_the_config_and_runs_in_order():
    from imgclf_jax import config as config_lib

    def vertical_flip(image, rng, settings):
        return image[::-1] if rng.random() < 0.5 else image

    AUGMENT_OPS.register("vertical_flip", AugmentOp({"vertical_flip": False}, vertical_flip))
    try:
        c = config_lib.base_config()
        assert c.augment.vertical_flip is False
        for key, value in [("augment.ops", "keras_affine,horizontal_flip,vertical_flip"),
                           ("augment.vertical_flip", "true"), ("augment.horizontal_flip", "true")]:
            config_lib.apply_override(c, key, value)
        config_lib.validate(c)
        params = AugmentParams(**c.augment.to_dict())
        image = np.random.default_rng(1).integers(0, 256, (6, 5, 3)).astype(np.uint8)
        for seed in range(4):
            rng = np.random.default_rng(seed)
            expected = image.astype(np.float32)
            expected = expected[:, ::-1] if rng.random() < 0.5 else expected
            expected = expected[::-1] if rng.random() < 0.5 else expected
            np.testing.assert_array_equal(random_augment(image, np.random.default_rng(seed), params), expected)
    finally:
        AUGMENT_OPS.unregister("vertical_flip")
    assert "vertical_flip" not in config_lib.base_config().augment


# ----------------------------------------------------------------- random_crop


def test_reflect_padding_by_hand_on_a_tiny_array():
    from imgclf_jax.data.augment import random_crop

    image = np.arange(9, dtype=np.float32).reshape(3, 3, 1).repeat(3, axis=-1)  # rows [0 1 2] [3 4 5] [6 7 8]

    class Fixed:  # an rng whose one draw is the given (row, column) offset
        def __init__(self, offset):
            self.offset = offset

        def integers(self, low, high, size):
            assert (low, high, size) == (0, 5, 2)  # p = 2: offsets in {0..4}
            return np.array(self.offset)

    settings = {"crop_padding": 2, "crop_padding_mode": "reflect"}
    # Reflect-padded by 2 (no edge repeat), row 0 .. 6 of the 7x7 padded image: [8 7 6 7 8 7 6], ...
    # offset (0, 0) is the top-left 3x3 of it.
    np.testing.assert_array_equal(random_crop(image, Fixed((0, 0)), settings)[..., 0],
                                  [[8, 7, 6], [5, 4, 3], [2, 1, 0]])
    np.testing.assert_array_equal(random_crop(image, Fixed((2, 2)), settings), image)  # the centre: unchanged
    np.testing.assert_array_equal(random_crop(image, Fixed((1, 3)), settings)[..., 0],
                                  [[4, 5, 4], [1, 2, 1], [4, 5, 4]])
    np.testing.assert_array_equal(random_crop(image, Fixed((4, 4)), dict(settings, crop_padding_mode="edge"))[..., 0],
                                  [[8, 8, 8], [8, 8, 8], [8, 8, 8]])
    np.testing.assert_array_equal(random_crop(image, Fixed((0, 1)), dict(settings, crop_padding_mode="constant"))
                                  [..., 0], [[0, 0, 0], [0, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_random_crop_equals_the_padded_array_sliced_at_the_drawn_offset(mode):
    image = np.random.default_rng(0).integers(0, 256, (10, 10, 3)).astype(np.uint8)
    params = AugmentParams(ops=("random_crop",), crop_padding=4, crop_padding_mode=mode)
    padded = np.pad(image.astype(np.float32), ((4, 4), (4, 4), (0, 0)), mode=mode)
    offsets = set()
    for seed in range(12):
        top, left = np.random.default_rng(seed).integers(0, 9, size=2)
        out = random_augment(image, np.random.default_rng(seed), params)
        assert out.dtype == np.float32 and out.shape == (10, 10, 3)
        np.testing.assert_array_equal(out, padded[top:top + 10, left:left + 10])
        offsets.add((int(top), int(left)))
    assert len(offsets) > 6  # the offsets vary


def test_crop_then_flip_draws_the_offset_then_the_flip():
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    params = AugmentParams(ops=("random_crop", "horizontal_flip"), crop_padding=2, horizontal_flip=True,
                           rotation_deg=0.0)
    padded = np.pad(image.astype(np.float32), ((2, 2), (2, 2), (0, 0)), mode="reflect")
    flips = set()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        top, left = rng.integers(0, 5, size=2)
        expected = padded[top:top + 8, left:left + 8]
        flip = rng.random() < 0.5
        expected = expected[:, ::-1] if flip else expected
        np.testing.assert_array_equal(random_augment(image, np.random.default_rng(seed), params), expected)
        flips.add(flip)
    assert flips == {True, False}


def test_random_crop_at_its_defaults_is_off_and_draws_nothing():
    image = np.random.default_rng(2).integers(0, 256, (6, 6, 3)).astype(np.uint8)
    off = AugmentParams(ops=("random_crop", "horizontal_flip"), horizontal_flip=True)
    only_flip = AugmentParams(ops=("horizontal_flip",), horizontal_flip=True)
    assert not AugmentParams(ops=("random_crop",)).active
    for seed in range(6):  # the flip's draw is the generator's first: nothing was drawn before it
        np.testing.assert_array_equal(random_augment(image, np.random.default_rng(seed), off),
                                      random_augment(image, np.random.default_rng(seed), only_flip))
