"""predict and submission.csv on a run trained for one epoch on a few dozen real images."""

import csv
import json
import pathlib
import subprocess
import sys

import pytest

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
