"""The vote and results tools: majority per id, deterministic ties, clear errors; a results table."""

import pathlib
import subprocess
import sys

import pytest

from imgclf_jax.vote import majority_vote

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write(path, rows, header="image_id,label"):
    path.write_text(header + "\n" + "".join(f"{i},{l}\n" for i, l in rows))
    return path


def test_majority_and_ties_go_to_the_earliest_file():
    a = {"x": 1, "y": 2, "z": 0}
    b = {"x": 1, "y": 3, "z": 4}
    c = {"x": 0, "y": 3, "z": 2}
    assert majority_vote([a, b, c]) == {"x": 1, "y": 3, "z": 0}  # z: 0/4/2 all tied -> a's 0
    assert majority_vote([c, b, a])["z"] == 2
    assert majority_vote([a, b]) == {"x": 1, "y": 2, "z": 0}


def run(*args):
    return subprocess.run([sys.executable, "-m", "imgclf_jax.vote", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_merges_in_the_first_files_order(tmp_path):
    a = write(tmp_path / "a.csv", [("q", 1), ("p", 2), ("r", 0)])
    b = write(tmp_path / "b.csv", [("p", 3), ("r", 4), ("q", 1)])
    c = write(tmp_path / "c.csv", [("r", 4), ("q", 2), ("p", 3)])
    out = tmp_path / "merged.csv"
    done = run(a, b, c, "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "image_id,label\nq,1\np,3\nr,4\n"


def test_cli_errors_name_the_file(tmp_path):
    a = write(tmp_path / "a.csv", [("q", 1), ("p", 2)])
    b = write(tmp_path / "b.csv", [("q", 1), ("s", 2)])
    done = run(a, b, "--out", tmp_path / "m.csv")
    assert done.returncode == 1 and "'" + str(b) + "' has other ids" in done.stderr
    bad = write(tmp_path / "bad.csv", [("q", 1), ("p", 2)], header="id,label")
    done = run(a, bad, "--out", tmp_path / "m.csv")
    assert "bad.csv' line 1: missing column(s) image_id" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = run(a, "--out", tmp_path / "m.csv")
    assert done.returncode == 2 and "at least two files" in done.stderr


def test_results_table_reads_finished_runs(tmp_path):
    import json
    run = tmp_path / "runA"
    run.mkdir()
    (run / "history.json").write_text(json.dumps([
        {"epoch": 1, "val_accuracy": 0.5, "seconds": 30.0}, {"epoch": 2, "val_accuracy": 0.75, "seconds": 90.0}]))
    (run / "summary.json").write_text(json.dumps(
        {"num_params": 1234567, "best_epoch": 2, "train_images_per_s": 61.26, "num_train_examples": 100}))
    done = subprocess.run([sys.executable, "-m", "imgclf_jax.results", str(run)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "| runA | 1,234,567 | 0.7500 | 2 | 2 | 2.0 min | 61.3 | 100 |"
