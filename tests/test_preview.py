"""The preview tool: a deterministic grid of what the model gets, and one epoch's class counts."""

import pathlib
import re

import numpy as np
from PIL import Image

from imgclf_jax import preview

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_preview(tmp_path, capsys, name, *extra):
    out = tmp_path / f"{name}.png"
    code = preview.main(["--config", str(ROOT / "configs/digits.py"), "--out", str(out),
                         f"--config.data.cache_dir={tmp_path / 'cache'}", "--num_images", "16", *extra])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"wrote {out} (16 images)"
    return np.asarray(Image.open(out)), parse_counts(lines[-1])


def parse_counts(line):
    """The readable counts line -> the numbers it states (class names here are digits: no ', ' in them)."""
    match = re.fullmatch(r"epoch (\d+): (\d+) examples -> (\d+) rows in (\d+) batches; per class: (.*)", line)
    assert match, line
    epoch, examples, rows, steps = map(int, match.groups()[:4])
    pairs = (item.split(": ") for item in match.group(5).split(", "))
    return {"epoch": epoch, "examples": examples, "rows_per_epoch": rows, "steps_per_epoch": steps,
            "class_counts": {name: int(count) for name, count in pairs}}


def test_same_seed_same_grid_other_seed_other_grid(tmp_path, capsys):
    a, counts = run_preview(tmp_path, capsys, "a")
    b, _ = run_preview(tmp_path, capsys, "b")
    c, _ = run_preview(tmp_path, capsys, "c", "--config.seed=1")
    assert a.shape == b.shape and a.ndim == 3
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    # 1,437 training digits, each once per epoch, batches of 32.
    assert counts["rows_per_epoch"] == 1437 and counts["steps_per_epoch"] == 45
    assert sum(counts["class_counts"].values()) == 1437 and len(counts["class_counts"]) == 10
    assert counts["epoch"] == 1 and counts["examples"] == 1437


def test_counts_follow_class_repeats(tmp_path, capsys):
    _, counts = run_preview(tmp_path, capsys, "r", "--config.data.class_repeats=(1,1,1,1,1,1,1,1,1,3)")
    _, plain = run_preview(tmp_path, capsys, "p")
    got, base = counts["class_counts"], plain["class_counts"]
    assert got["9"] == 3 * base["9"] and got["0"] == base["0"]
    assert counts["rows_per_epoch"] == 1437 + 2 * base["9"]


def test_the_grid_undoes_the_channel_normalization(tmp_path, capsys):
    plain, _ = run_preview(tmp_path, capsys, "plain")
    normalized, _ = run_preview(tmp_path, capsys, "norm", "--config.data.channel_mean=0.5,0.25,0.75",
                                "--config.data.channel_std=0.25,0.5,2.0")
    # The pixels, not the model's input: equal but for float rounding ((x - m) / s * s + m), which moves
    # a few PNG values by one 8-bit level (without the undo, most pixels would differ widely).
    difference = np.abs(plain.astype(int) - normalized.astype(int))
    assert difference.max() <= 1 and np.mean(difference > 0) < 1e-4
