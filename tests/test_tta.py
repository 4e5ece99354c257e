"""Test-time augmentation entries with keys (the ``tta`` section), against views computed by hand."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgclf_jax import cli, config as config_lib, eval_transforms, steps
from imgclf_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
H = W = 6
CLASSES = 4


def linear_model(seed=0):
    """A 'model' that is a fixed linear function of every pixel (so shifts and flips change its logits)."""
    weights = np.random.default_rng(seed).normal(0, 1.0, (H * W * 3, CLASSES)).astype(np.float32)
    return weights, lambda images: images.reshape(images.shape[0], -1) @ jnp.asarray(weights)


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("s", [1, 2])
def test_flip_shift_tta_is_the_mean_softmax_of_the_ten_views_by_hand(s):
    weights, apply_logits = linear_model()
    images = np.random.default_rng(1).uniform(0, 1, (3, H, W, 3)).astype(np.float32)
    tta = eval_transforms.entry("flip_shift_tta").bind({"shift_pixels": s})
    got = np.asarray(jax.nn.softmax(jax.jit(lambda x: tta(apply_logits, x))(images), axis=-1))
    padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="reflect")
    views = []
    for mirrored in (False, True):
        for dy, dx in ((0, 0), (s, 0), (-s, 0), (0, s), (0, -s)):  # content moved dy down, dx right
            view = padded[:, s - dy:s - dy + H, s - dx:s - dx + W]
            views.append(view[:, :, ::-1] if mirrored else view)
    # A shift right by s: column c >= s shows column c - s; column c < s its reflection s - c.
    right = views[3]
    np.testing.assert_array_equal(right[:, :, s:], images[:, :, :-s])
    np.testing.assert_array_equal(right[:, :, 0], images[:, :, s])
    assert len(views) == 10 and eval_transforms.shift_views(s)[3] == (False, 0, s)
    expected = np.mean([softmax(v.reshape(3, -1).astype(np.float64) @ weights) for v in views], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    flip_only = np.asarray(jax.nn.softmax(eval_transforms.horizontal_flip_tta(apply_logits, images), -1))
    assert not np.allclose(got, flip_only, atol=1e-4)  # the shifted views count


def test_flip_shift_tta_stays_finite_when_a_view_is_certain():
    images = np.zeros((2, H, W, 3), np.float32)
    images[:, :, :3] = 1.0  # the left half bright: the mirror sees the other half

    def apply_logits(x):  # +-1000 logits: softmax probabilities of 0 in float32
        side = x[:, :, :3].mean((1, 2, 3)) - x[:, :, 3:].mean((1, 2, 3))
        return jnp.stack([1000.0 * side, -1000.0 * side], axis=-1)

    out = eval_transforms.entry("flip_shift_tta").bind({"shift_pixels": 1})(apply_logits, images)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(out, -1)), 0.5, atol=1e-6)  # 5 views each way


def test_the_tta_section_is_declared_by_the_entries_and_checked():
    c = config_lib.base_config()
    assert c.tta.to_dict() == {"shift_pixels": 2} and c.train.eval_transform == ""
    ml6 = str(ROOT / "configs" / "ml6.py")
    args = cli.parse_args(["--config", ml6, "--config.train.eval_transform=flip_shift_tta",
                           "--config.tta.shift_pixels=3"])
    _, transform = steps.eval_hooks(args.config)
    assert transform.func is eval_transforms.flip_shift_tta and transform.keywords == {"shift_pixels": 3}
    for overrides, message in [
        (["--config.tta.shift_pixels=3"], "config key 'tta.shift_pixels' (3) is not used by train.eval_transform='': "
                                          "leave it at 2, or choose an entry that uses it"),
        (["--config.train.eval_transform=horizontal_flip_tta", "--config.tta.shift_pixels=1"],
         "config key 'tta.shift_pixels' (1) is not used by train.eval_transform='horizontal_flip_tta'"),
        (["--config.train.eval_transform=flip_shift_tta", "--config.tta.shift_pixels=0"],
         "config key 'tta.shift_pixels' must be an int >= 1 pixels, got 0"),
    ]:
        with pytest.raises(ConfigError) as info:
            cli.parse_args(["--config", ml6, *overrides])
        assert str(info.value).startswith(message)
    # A run's config.json from before the tta section: the key's default.
    old = ml_collections.ConfigDict({"train": {"eval_transform": "flip_shift_tta"}})
    assert eval_transforms.from_config(old).keywords == {"shift_pixels": 2}
    assert eval_transforms.from_config(ml_collections.ConfigDict({"train": {}})) is None


def test_a_plain_function_is_an_entry_without_keys():
    def mean_of_two(apply_logits, images):
        return apply_logits(images)

    eval_transforms.EVAL_TRANSFORMS.register("plain_test_tta", mean_of_two)
    try:
        assert eval_transforms.entry("plain_test_tta").bind({"shift_pixels": 5}) is mean_of_two
        c = config_lib.base_config()
        c.train.eval_transform = "plain_test_tta"
        config_lib.validate_recipe(c)  # no tta key is read: all at their defaults, accepted
        c.tta.shift_pixels = 3
        with pytest.raises(ConfigError, match="is not used by train.eval_transform='plain_test_tta'"):
            config_lib.validate_recipe(c)
    finally:
        eval_transforms.EVAL_TRANSFORMS.unregister("plain_test_tta")
