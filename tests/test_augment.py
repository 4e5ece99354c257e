"""Augmentation against hand-computed pixels."""

import numpy as np
import pytest

from imgclf_jax.data.augment import AugmentParams, affine_matrix, random_augment, warp


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
