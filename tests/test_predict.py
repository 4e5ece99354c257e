"""predict and submission.csv on a run trained for one epoch on a few dozen real images."""

import colorsys
import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import copy_with_test_split, read_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


def read_csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def trained_run(small_competition, tmp_path_factory):
    """ml1 for one epoch on 40 real train images; validation 15; a 6-image test split."""
    tmp = tmp_path_factory.mktemp("predict")
    data = tmp / "data"
    test_ids = [f"z{5 - i}" for i in range(6)]  # not sorted: the submission must keep test.csv order
    copy_with_test_split(small_competition, data, test_ids)
    (data / "test.csv").write_text("image_id\n" + "\n".join(test_ids) + "\n")
    workdir = tmp / "run"
    done = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/ml1.py", "--config.train.num_epochs=1",
         f"--config.data.dir={data}", f"--config.data.cache_dir={tmp / 'cache'}", "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, workdir, test_ids


def run_predict(*args):
    return subprocess.run([sys.executable, "-m", "imgclf_jax.predict", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_training_writes_a_submission_in_test_csv_order(trained_run):
    _, workdir, test_ids = trained_run
    rows = read_csv_rows(workdir / "submission.csv")
    assert rows[0] == ["image_id", "label"]
    assert [r[0] for r in rows[1:]] == test_ids  # test.csv order, not sorted
    assert all(r[1] in {"0", "1", "2", "3", "4"} for r in rows[1:])


def test_predict_on_the_validation_folder_reproduces_validation_accuracy(trained_run, tmp_path):
    data, workdir, _ = trained_run
    out = tmp_path / "val_predictions.csv"
    done = run_predict("--workdir", workdir, "--images", data / "validation", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv_rows(out)
    truth = dict(read_rows(data / "validation.csv"))
    assert rows[0] == ["image_id", "label"] and len(rows) == 1 + len(truth)
    ids = [r[0] for r in rows[1:]]
    assert ids == sorted(truth) and all("." not in i for i in ids)  # sorted, no extensions
    accuracy = sum(int(label) == truth[i] for i, label in rows[1:]) / len(truth)
    summary = json.loads((workdir / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["result_val_accuracy"], abs=1e-9)

    # A CSV of ids (here validation.csv, its label column ignored) keeps the CSV's order.
    out_csv = tmp_path / "from_csv.csv"
    done = run_predict("--workdir", workdir, "--images", data / "validation.csv", "--out", out_csv)
    assert done.returncode == 0, done.stderr[-3000:]
    by_csv = read_csv_rows(out_csv)
    assert [r[0] for r in by_csv[1:]] == [i for i, _ in read_rows(data / "validation.csv")]
    assert dict(map(tuple, by_csv[1:])) == dict(map(tuple, rows[1:]))


def test_predict_errors_are_one_line(trained_run, tmp_path):
    _, workdir, _ = trained_run
    done = run_predict("--workdir", tmp_path, "--images", tmp_path, "--out", tmp_path / "x.csv")
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    done = run_predict("--workdir", workdir, "--out", tmp_path / "x.csv")
    assert done.returncode == 2 and "--images is required" in done.stderr


# ----------------------------------------------------------------------------- class names, not indices


def test_write_submission_writes_class_names(tmp_path):
    from imgclf_jax.report import write_submission

    names = sorted(str(k) for k in range(12))  # folder order: '0', '1', '10', '11', '2', ...
    assert names[2] == "10"
    out = tmp_path / "s.csv"
    write_submission(str(out), ["a", "b", "c"], [2, 3, 4], names)
    assert read_csv_rows(out) == [["image_id", "label"], ["a", "10"], ["b", "11"], ["c", "2"]]
    write_submission(str(out), ["x"], [1], ["cat", "dog"])
    assert read_csv_rows(out)[1] == ["x", "dog"]
    with pytest.raises(ValueError, match="outside 0..1"):
        write_submission(str(out), ["x"], [2], ["cat", "dog"])


COLOURS = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / 12, 1.0, 1.0 if k % 2 else 0.6)) for k in range(12)]


def solid(k: int, rng) -> Image.Image:
    pixels = np.clip(np.array(COLOURS[k])[None, None] + rng.integers(-8, 9, (8, 8, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def twelve_class_run(tmp_path_factory):
    """configs/folders.py, shrunk, on class folders '0'..'11' of solid colours; a flat test/ of one image per class."""
    tmp = tmp_path_factory.mktemp("twelve")
    data, rng = tmp / "data", np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for k in range(12):
            (data / split / str(k)).mkdir(parents=True)
            for i in range(count):
                solid(k, rng).save(data / split / str(k) / f"{split}{i}.png")
    (data / "test").mkdir()
    for k in range(12):
        solid(k, rng).save(data / "test" / f"c{k}.png")  # the id names the true class
    workdir = tmp / "run"
    overrides = {"data.dir": data, "data.cache_dir": tmp / "cache", "data.num_classes": 12, "data.image_size": 8,
                 "model.conv_filters": "(8,)", "model.conv_kernel_sizes": "(3,)", "model.conv_paddings": "same",
                 "model.conv_pools": "(True,)", "model.conv_dropouts": "(0.0,)", "model.dense_units": "(32,)",
                 "model.dense_dropouts": "(0.0,)", "augment.rotation_deg": 0, "augment.shift_fraction": 0,
                 "augment.zoom_fraction": 0, "augment.horizontal_flip": "false", "train.num_epochs": 25,
                 "train.batch_size": 16, "optimizer.learning_rate": 0.02, "train.early_stopping.monitor": ""}
    done = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/folders.py", "--workdir", str(workdir),
         *[f"--config.{k}={v}" for k, v in overrides.items()]],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, workdir


def test_twelve_classes_are_written_by_name_in_submission_and_predict(twelve_class_run, tmp_path):
    data, workdir = twelve_class_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["result_val_accuracy"] == 1.0  # solid colours: every class learnt (so names are checkable)
    submission = read_csv_rows(workdir / "submission.csv")
    assert submission[0] == ["image_id", "label"]
    # Each test image's id names its class: the written label is that folder name ('10', not its index 2).
    assert {image_id: label for image_id, label in submission[1:]} == {f"c{k}": str(k) for k in range(12)}
    out = tmp_path / "predicted.csv"
    done = run_predict("--workdir", workdir, "--images", data / "test", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(read_csv_rows(out)[1:]) == sorted(submission[1:])  # predict writes what training wrote
