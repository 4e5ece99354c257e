"""channel_stats: the per-channel mean and std of a training split, against numbers computed by hand."""

import pathlib

import numpy as np
import pytest

from imgclf_jax import channel_stats, cli, config as config_lib
from imgclf_jax.data import splits

ROOT = pathlib.Path(__file__).resolve().parents[1]


def split_of(images):
    source = [{"image": np.asarray(image, np.uint8)} for image in images]
    return splits.Split(source=source, records=np.arange(len(images)), labels=np.zeros(len(images), np.int64),
                        image_ids=[str(i) for i in range(len(images))])


def test_mean_and_std_by_hand_over_every_pixel():
    c = config_lib.base_config()
    c.data.image_size = 2
    c.data.channel_mean, c.data.channel_std = (0.9, 0.9, 0.9), (3.0, 3.0, 3.0)  # ignored: stats of the pixels
    black, white = np.zeros((2, 2, 3)), np.full((2, 2, 3), 255)
    mixed = np.zeros((2, 2, 3))
    mixed[..., 1] = [[0, 51], [102, 255]]  # green 0, 0.2, 0.4, 1.0; red and blue 0
    mean, std = channel_stats.channel_stats(split_of([black, white, mixed]), c)
    # Red, blue: 12 pixels, 4 of them 1 -> mean 1/3, std sqrt(1/3 - 1/9) = sqrt(2)/3.
    # Green: 4 x 0, 4 x 1, 0, 0.2, 0.4, 1 -> mean 5.6/12, E[x^2] = (4 + 0.04 + 0.16 + 1)/12 = 5.2/12.
    green_var = 5.2 / 12 - (5.6 / 12) ** 2
    np.testing.assert_allclose(mean, [1 / 3, 5.6 / 12, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(std, [np.sqrt(2) / 3, np.sqrt(green_var), np.sqrt(2) / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        channel_stats.channel_stats(split_of([]), c)


def test_the_command_prints_overrides_that_parse(tmp_path, capsys):
    code = channel_stats.main(["--config", str(ROOT / "configs/digits.py"),
                               f"--config.data.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("1,437 training images at 32x32, per channel (R, G, B), [0, 1] scale:")
    overrides = lines[1].split()
    args = cli.parse_args(["--config", str(ROOT / "configs/digits.py"), *overrides])  # validated
    mean, std = args.config.data.channel_mean, args.config.data.channel_std
    assert mean[0] == mean[1] == mean[2] and std[0] == std[1] == std[2]  # gray digits: equal channels
    assert 0.05 < mean[0] < 0.5 and 0.1 < std[0] < 0.5
    assert lines[2] == f"c.data.channel_mean = ({mean[0]:.4f}, {mean[1]:.4f}, {mean[2]:.4f})"
