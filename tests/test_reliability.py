"""Bad input, NaN losses, concurrent preparation, other device counts: clear errors, nothing lost."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from imgclf_jax import config as config_lib, loop, steps
from imgclf_jax.data import builders
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import DataError, TrainingError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def snapshot(folder: pathlib.Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_image_names_file_and_csv_line(small_competition, tmp_path):
    root = copy_of(small_competition, tmp_path / "data")
    lines = (root / "train.csv").read_text().splitlines()
    victim = next((root / "train").glob(lines[3].split(",")[0] + ".*"))
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError) as info:
        builders.prepare("competition", str(root), str(tmp_path / "cache"))
    assert str(victim) in str(info.value) and "(train.csv line 4)" in str(info.value)
    assert os.listdir(tmp_path / "cache") == []  # nothing half-written is left
    victim.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"cannot be read.*\(train.csv line 4\)"):
        builders.prepare("competition", str(root), str(tmp_path / "cache"))


def test_other_sizes_are_resized_with_one_warning(small_competition, tmp_path, capfd):
    root = copy_of(small_competition, tmp_path / "data")
    lines = (root / "train.csv").read_text().splitlines()
    for line in lines[1:3]:
        victim = next((root / "train").glob(line.split(",")[0] + ".*"))
        Image.new("RGB", (64, 48), (200, 10, 10)).save(victim)
    prepared = builders.prepare("competition", str(root), str(tmp_path / "cache"))
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and "2 of 55 images are not 100x100" in err
    assert prepared.splits["train"].source[0]["image"].shape == (48, 64, 3)


def test_the_data_folder_is_never_written(small_competition, tmp_path):
    before = snapshot(small_competition)
    c = config_lib.load_config_file(str(ROOT / "configs/ml1.py"))
    c.data.dir, c.data.cache_dir = str(small_competition), str(tmp_path / "cache")
    c.train.num_epochs, c.train.batch_size = 1, 16
    c.model.conv_filters, c.model.dense_units = (4, 4, 4), (8,)
    loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert snapshot(small_competition) == before


def test_concurrent_preparations_agree_and_leave_no_temporary_folder(small_competition, tmp_path):
    code = ("import sys; from imgclf_jax.data import builders; "
            "print(builders.prepare('competition', sys.argv[1], sys.argv[2]).path)")
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(small_competition), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1 and os.listdir(cache) == [os.path.basename(paths.pop())]


def test_an_abandoned_preparation_is_not_trusted_and_is_cleaned(small_competition, tmp_path):
    cache = tmp_path / "cache"
    first = builders.prepare("competition", str(small_competition), str(cache))
    shutil.rmtree(first.path)
    stale = pathlib.Path(f"{first.path}.tmp-999999999-deadbeef")  # a killed process's half-written folder
    (stale / "competition").mkdir(parents=True)
    (stale / "competition" / "garbage").write_text("half")
    again = builders.prepare("competition", str(small_competition), str(cache))
    assert again.path == first.path and len(again.splits["train"].labels) == 40
    assert not stale.exists()


def tiny_digits(tmp_path, epochs=2):
    c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.max_train_examples, c.data.max_val_examples = 256, 64
    c.train.num_epochs = epochs
    return c


def test_nan_loss_stops_at_its_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from imgclf_jax import checkpoint as ckpt_lib

    real_jit, real_close = steps.jit_train_step, ckpt_lib.RunCheckpoints.close
    calls = {"n": 0}
    closed = []

    def counted_close(self):
        closed.append(self._manager is not None)  # whether a checkpoint manager was open when closed
        real_close(self)

    def poisoned_jit(*args, **kwargs):
        step = real_jit(*args, **kwargs)

        def wrapped(state, batch, key):
            state, metrics = step(state, batch, key)
            calls["n"] += 1
            if calls["n"] == 11:  # the 3rd step of epoch 2 (8 steps per epoch)
                metrics = dict(metrics, loss_sum=metrics["loss_sum"] * np.nan)
            return state, metrics
        return wrapped

    monkeypatch.setattr(steps, "jit_train_step", poisoned_jit)
    monkeypatch.setattr(ckpt_lib.RunCheckpoints, "close", counted_close)
    workdir = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss is nan at step 11 \(epoch 2, batch 3\)"):
        loop.train_and_evaluate(tiny_digits(tmp_path), str(workdir))
    assert len(json.loads((workdir / "history.json").read_text())) == 1
    assert os.listdir(workdir / "checkpoints" / "latest") == ["8"]  # the end of epoch 1, intact
    assert closed == [True]  # the driver's with-block closed the open checkpoint manager on the way out


def test_checkpoint_from_one_device_resumes_on_two(tmp_path):
    assert len(jax.local_devices()) == 2
    cache = tmp_path / "cache"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/digits.py",
           "--config.data.max_train_examples=256", "--config.data.max_val_examples=64",
           f"--config.data.cache_dir={cache}", "--workdir", str(tmp_path / "run")]
    done = subprocess.run(cmd + ["--config.train.num_epochs=1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["devices"] == ["cpu:0"]
    summary = loop.train_and_evaluate(tiny_digits(tmp_path), str(tmp_path / "run"))  # 2 devices here
    assert summary["devices"] == ["cpu:0", "cpu:1"] and summary["epochs_run"] == 2
    straight = loop.train_and_evaluate(tiny_digits(tmp_path), str(tmp_path / "straight"))
    a = json.loads((tmp_path / "run" / "history.json").read_text())
    b = json.loads((tmp_path / "straight" / "history.json").read_text())
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["val_accuracy"] == pytest.approx(y["val_accuracy"], abs=2 / 64)


def test_cache_dir_and_workdir_problems_are_one_line_errors(small_competition, tmp_path):
    from imgclf_jax.errors import ConfigError
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"'data.cache_dir' .* cannot be written"):
        builders.prepare("competition", str(small_competition), str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=r"'data.cache_dir' .* cannot be written"):
        builders.prepare("competition", str(small_competition), str(tmp_path / "afile" / "sub"))
    c = tiny_digits(tmp_path)
    c.data.dir = str(small_competition)
    with pytest.raises(ConfigError, match="lies inside data.dir"):
        workdir_lib.check_workdir(str(small_competition / "runs" / "x"), c, overwrite=False)
    foreign = tmp_path / "project"
    (foreign / "src").mkdir(parents=True)
    (foreign / "config.json").write_text('{"name": "my-app"}')
    (foreign / "src" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an imgclf_jax run's"):
        workdir_lib.check_workdir(str(foreign), tiny_digits(tmp_path), overwrite=True)
    assert (foreign / "src" / "precious.txt").exists()


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    workdir = tmp_path / "run"
    loop.train_and_evaluate(tiny_digits(tmp_path, epochs=1), str(workdir))
    (workdir / "notes.txt").write_text("mine")
    c = tiny_digits(tmp_path, epochs=1)
    c.optimizer.learning_rate = 0.01
    workdir_lib.check_workdir(str(workdir), c, overwrite=True)
    assert sorted(os.listdir(workdir)) == ["notes.txt"]


def test_nan_weights_at_the_end_of_an_epoch_are_never_saved(tmp_path):
    c = tiny_digits(tmp_path, epochs=2)
    c.optimizer.learning_rate = 1e30
    c.data.max_train_examples = 32  # one step per epoch: the NaN shows only in validation
    with pytest.raises(TrainingError, match="validation loss is nan after epoch 1"):
        loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints" / "latest")


def test_a_model_too_deep_for_the_image_stops_before_any_data_work(tmp_path):
    from imgclf_jax.errors import ConfigError
    c = config_lib.load_config_file(str(ROOT / "configs/ml1.py"))
    c.data.image_size = 16
    c.data.dir = str(tmp_path / "never_read")
    with pytest.raises(ConfigError, match="leaves no pixels of a 16x16 image"):
        loop.train_and_evaluate(c, str(tmp_path / "run"))


def test_the_same_images_copied_anew_resume_and_a_changed_pixel_is_refused(small_competition, tmp_path):
    """New modification times re-prepare the data (the cache key) but the content digest, and so the run,
    stay the same; one changed pixel changes the digest."""
    from imgclf_jax.errors import ConfigError
    root = copy_of(small_competition, tmp_path / "data")
    c = config_lib.load_config_file(str(ROOT / "configs/ml1.py"))
    c.data.dir, c.data.cache_dir = str(root), str(tmp_path / "cache")
    c.train.num_epochs, c.train.batch_size = 1, 16
    c.model.conv_filters, c.model.dense_units, c.data.image_size = (4, 4, 4), (8,), 32
    first = builders.prepare("competition", str(root), c.data.cache_dir)
    assert first.content_digest.startswith("content-")
    loop.train_and_evaluate(c, str(tmp_path / "run"))
    for path in root.rglob("*"):  # the same bytes with new modification times, as a fresh copy has
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    again = builders.prepare("competition", str(root), c.data.cache_dir)
    assert again.path != first.path and again.content_digest == first.content_digest
    c.train.num_epochs = 2
    loop.train_and_evaluate(c, str(tmp_path / "run"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [e["epoch"] for e in history] == [1, 2]
    image = sorted((root / "validation").glob("*.png"))[0]  # PNG: lossless, one pixel changes
    pixels = np.array(Image.open(image).convert("RGB"))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    changed = builders.prepare("competition", str(root), c.data.cache_dir)
    assert changed.content_digest != first.content_digest
    c.train.num_epochs = 3
    with pytest.raises(ConfigError, match=f"the data changed since the run.*{first.content_digest} -> content-"):
        loop.train_and_evaluate(c, str(tmp_path / "run"))


def test_resuming_on_changed_data_is_refused(small_competition, tmp_path):
    from imgclf_jax.errors import ConfigError
    root = copy_of(small_competition, tmp_path / "data")
    c = config_lib.load_config_file(str(ROOT / "configs/ml1.py"))
    c.data.dir, c.data.cache_dir = str(root), str(tmp_path / "cache")
    c.train.num_epochs, c.train.batch_size = 1, 16
    c.model.conv_filters, c.model.dense_units, c.data.image_size = (4, 4, 4), (8,), 32
    loop.train_and_evaluate(c, str(tmp_path / "run"))
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(lines[:-1]) + "\n")
    c.train.num_epochs = 2
    with pytest.raises(ConfigError, match="the data changed since the run"):
        loop.train_and_evaluate(c, str(tmp_path / "run"))
