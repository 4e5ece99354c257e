"""The logs other tools read (imgclf_jax.tracking): metrics.csv in Keras CSVLogger's layout, TensorBoard
event files without TensorFlow. (Resumed runs' logs: tests/test_resume.py.)"""

import csv
import json
import pathlib

import numpy as np
import pytest

from imgclf_jax import config as config_lib
from imgclf_jax import loop, tracking

ROOT = pathlib.Path(__file__).resolve().parents[1]


def entry(epoch, **values):
    return {"epoch": epoch, **values}


def test_metrics_csv_is_keras_csvlogger_layout(tmp_path):
    history = [
        entry(1, train_loss=1.5, train_accuracy=0.25, val_loss=1.25, val_accuracy=0.5, learning_rate=0.001,
              train_images_per_s=None, seconds=3.0),
        entry(2, train_loss=0.75, train_accuracy=0.5, val_loss=1.0, val_accuracy=0.625, learning_rate=0.0005,
              train_images_per_s=120.5, seconds=2.5),
    ]
    path = tmp_path / "metrics.csv"
    tracking.write_metrics_csv(str(path), history)
    # Keras: 'epoch' first and 0-based, then the metric names sorted; loss/accuracy are the training metrics.
    assert path.read_bytes().decode() == (
        "epoch,accuracy,learning_rate,loss,seconds,train_images_per_s,val_accuracy,val_loss\r\n"
        "0,0.25,0.001,1.5,3.0,,0.5,1.25\r\n"
        "1,0.5,0.0005,0.75,2.5,120.5,0.625,1.0\r\n")


def test_an_ensembles_csv_has_member_and_vote_columns_and_empty_cells_for_null(tmp_path):
    history = [entry(1, train_loss=[1.0, None], val_accuracy=[0.5, 0.25], trained=[True, False],
                     majority_val_accuracy=0.5, soft_val_accuracy=0.75, seconds=1.0)]
    path = tmp_path / "metrics.csv"
    tracking.write_metrics_csv(str(path), history)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["epoch", "majority_val_accuracy", "member_0_loss", "member_0_val_accuracy", "member_1_loss",
         "member_1_val_accuracy", "seconds", "soft_val_accuracy"],
        ["0", "0.5", "1.0", "0.5", "", "0.25", "1.0", "0.75"],
    ]
    assert tracking.epoch_scalars(history[0]) == {
        "member_0": {"train/loss": 1.0, "val/accuracy": 0.5},
        "member_1": {"val/accuracy": 0.25},  # the member that did not train: no train/loss point
        "vote_majority": {"val/accuracy": 0.5},
        "vote_soft": {"val/accuracy": 0.75},
    }


def test_window_losses_are_the_mean_since_the_previous_point():
    totals = {"loss_sum": 10.0, "correct": 3.0, "count": 4.0}
    assert tracking.window_losses(totals, None) == [2.5]  # since the epoch's start: 10 / 4
    assert tracking.window_losses(totals, {"loss_sum": 4.0, "correct": 1.0, "count": 2.0}) == [3.0]  # 6 / 2
    members = {"loss_sum": [10.0, 6.0], "count": [4.0, 2.0]}
    base = {"loss_sum": [4.0, 6.0], "count": [2.0, 2.0]}
    assert tracking.window_losses(members, base) == [3.0, None]  # member 1 had no images since (stopped)


def test_a_run_writes_metrics_csv_and_tensorboard_scalars_images_and_config(tmp_path):
    c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.max_train_examples, c.data.max_val_examples = 200, 100  # 200 / 32: 7 updates an epoch
    c.train.num_epochs = 2
    c.train.log_every_steps = 7  # one point an epoch: the epoch's mean training loss
    workdir = tmp_path / "run"
    loop.train_and_evaluate(c, str(workdir))
    history = json.loads((workdir / "history.json").read_text())
    assert all(h["train_images_per_s"] > 0 for h in history[1:])  # epoch 1's only steady steps may be few

    with open(workdir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row, h in zip(rows, history):
        assert float(row["loss"]) == h["train_loss"] and float(row["val_accuracy"]) == h["val_accuracy"]
        assert float(row["accuracy"]) == h["train_accuracy"] and float(row["val_loss"]) == h["val_loss"]

    points = tracking.read_events(str(workdir / "tensorboard"))
    by_tag = {}
    for tag, step, value in points:
        by_tag.setdefault(tag, []).append((step, value))
    for tag, key in (("val/accuracy", "val_accuracy"), ("train/loss", "train_loss"), ("val/loss", "val_loss"),
                     ("learning_rate", "learning_rate")):
        assert [s for s, _ in by_tag[tag]] == [1, 2]
        np.testing.assert_allclose([v for _, v in by_tag[tag]], [h[key] for h in history], rtol=1e-6)  # float32
    # Every 7 updates, the mean loss of those 7: here exactly each epoch's training loss.
    assert [s for s, _ in by_tag["train/loss_per_step"]] == [7, 14]
    np.testing.assert_allclose([v for _, v in by_tag["train/loss_per_step"]], [h["train_loss"] for h in history],
                               rtol=1e-6)
    assert by_tag["preview"] == [(0, "image")] and by_tag["confusion_matrix"] == [(2, "image")]
    (text_step, text), = by_tag["config/text_summary"]
    assert text_step == 0 and '"log_every_steps": 7' in text
    assert (workdir / "preview.png").stat().st_size > 0
