"""Interrupted runs resume exactly: kill -9 after an epoch, SIGTERM mid-epoch; history.json and the
TensorBoard log (each point once) end as an uninterrupted run's."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def command(workdir, cache, epochs=3, members=1):
    return [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/digits.py",
            f"--config.train.num_epochs={epochs}", "--config.data.max_train_examples=600",
            f"--config.data.cache_dir={cache}", f"--config.ensemble.num_members={members}",
            "--config.train.log_every_steps=5",  # 19 updates an epoch: points cross the epochs' starts
            "--workdir", str(workdir)]


def history(workdir):
    path = pathlib.Path(workdir) / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def without_seconds(entries):
    """History entries without their wall-clock figures (seconds, train_images_per_s)."""
    return [{k: v for k, v in e.items() if k not in ("seconds", "train_images_per_s")} for e in entries]


def logged(workdir):
    """Every TensorBoard point of a run, (folder, tag, step, value) sorted, wall-clock rates left out and the
    config text as 'text' (data.num_workers may differ; its content is tests/test_tracking.py's)."""
    from imgclf_jax.tracking import read_events

    root = pathlib.Path(workdir) / "tensorboard"
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    return sorted((f.name, tag, step, "text" if tag == "config/text_summary" else value)
                  for f in folders for tag, step, value in read_events(str(f)) if tag != "train/images_per_s")


def uninterrupted(tmp_path_factory, members):
    """The uninterrupted run's workdir and its data cache."""
    tmp = tmp_path_factory.mktemp("reference")
    done = subprocess.run(command(tmp / "run", tmp / "cache", members=members), cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "run", tmp / "cache"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory, members=1)


def start_and_wait(cmd, until, timeout=300, **popen_kwargs):
    """Starts `cmd` and returns its process once `until()` holds (or it ended, or `timeout` s passed)."""
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               **popen_kwargs)
    deadline = time.time() + timeout
    while not until() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return process


def rerun_and_compare(cmd, workdir, reference):
    """Reruns an interrupted command; it must resume and end with the uninterrupted run's history and
    TensorBoard points (the same points, each once), given that run's workdir `reference`."""
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    assert without_seconds(history(workdir)) == without_seconds(history(reference))
    points = logged(workdir)
    assert points == logged(reference)
    assert any(p[1:3] == ("train/loss_per_step", 20) for p in points)  # epoch 2's first update alone


def test_kill_9_after_the_second_epoch_resumes_bit_for_bit(reference, tmp_path):
    expected, cache = reference  # the uninterrupted run's workdir
    workdir = tmp_path / "run"
    process = start_and_wait(command(workdir, cache), lambda: len(history(workdir)) >= 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert len(history(workdir)) == 2
    rerun_and_compare(command(workdir, cache), workdir, expected)


def test_ctrl_c_to_the_process_group_with_data_workers_exits_cleanly(reference, tmp_path):
    """Ctrl-C in a terminal signals the whole process group, grain's worker processes included."""
    expected, cache = reference  # the uninterrupted run's workdir
    workdir = tmp_path / "run"
    cmd = command(workdir, cache) + ["--config.data.num_workers=2"]
    process = start_and_wait(cmd, lambda: len(history(workdir)) >= 1, start_new_session=True)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "checkpoint saved" in err
    rerun_and_compare(cmd, workdir, expected)  # workers change nothing either


RESNET_EMA = ["--config.model.name=resnet", "--config.model.stem_width=8", "--config.model.widths=(8,16)",
              "--config.model.depths=(1,1)", "--config.model.strides=(1,2)", "--config.train.ema_decay=0.9"]


def test_an_ensemble_with_batch_norm_and_ema_sigterm_mid_epoch_saves_and_resumes_exactly(tmp_path_factory,
                                                                                         tmp_path, members=2):
    """A 2-member ResNet job (BatchNorm statistics stacked per member in the train state) with EMA weights,
    SIGTERM mid-epoch: it saves, exits 130 with one line and no traceback, and the resumed run ends with the
    uninterrupted history and TensorBoard points. (The plain run restores through the same checkpoint code,
    mid-epoch in the Ctrl-C test above; each more job here costs CI two more runs.)"""
    tmp = tmp_path_factory.mktemp("reference_bn")
    reference = command(tmp / "run", tmp / "cache", epochs=2, members=members) + RESNET_EMA
    done = subprocess.run(reference, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = tmp / "run"
    workdir = tmp_path / "run"
    cmd = command(workdir, tmp / "cache", epochs=2, members=members) + RESNET_EMA
    process = start_and_wait(cmd, lambda: len(history(workdir)) >= 1)
    time.sleep(0.3)  # inside epoch 2 (or its evaluation)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "SIGTERM" in err and "checkpoint saved" in err and "Traceback" not in err
    assert len(history(workdir)) == 1  # stopped inside epoch 2
    rerun_and_compare(cmd, workdir, expected)
