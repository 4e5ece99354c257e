"""The vote tool: majority per id, deterministic ties, the first file's order, clear errors."""

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
