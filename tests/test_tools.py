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


def test_vote_merges_text_labels_of_folder_runs(tmp_path):
    # Class names as a folders run writes them; ties still go to the earliest file.
    a = write(tmp_path / "a.csv", [("cat/1", "cat"), ("dog/2", "dog"), ("x", "10")])
    b = write(tmp_path / "b.csv", [("cat/1", "dog"), ("dog/2", "bird"), ("x", "2")])
    c = write(tmp_path / "c.csv", [("cat/1", "dog"), ("dog/2", "cat"), ("x", "2")])
    out = tmp_path / "merged.csv"
    done = run(a, b, c, "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "image_id,label\ncat/1,dog\ndog/2,dog\nx,2\n"  # dog/2: 3-way tie -> a's
    assert majority_vote([{"i": "10"}, {"i": "2"}]) == {"i": "10"}  # text, not int: no '10' -> 2 confusion
    empty = write(tmp_path / "e.csv", [("cat/1", ""), ("dog/2", "dog"), ("x", "2")])
    done = run(a, empty, "--out", out)
    assert done.returncode == 1 and "e.csv' line 2: empty label for id 'cat/1'" in done.stderr


def fake_run(folder, best=0.75):
    import json
    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps([
        {"epoch": 1, "val_accuracy": 0.5, "seconds": 30.0}, {"epoch": 2, "val_accuracy": best, "seconds": 90.0}]))
    (folder / "summary.json").write_text(json.dumps(
        {"num_params": 1234567, "best_epoch": 2, "train_images_per_s": 61.26, "num_train_examples": 100}))
    (folder / "checkpoints" / "result").mkdir(parents=True)
    return folder


def run_results(*args):
    return subprocess.run([sys.executable, "-m", "imgclf_jax.results", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_results_lists_every_run_below_a_folder(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "b", best=0.625)
    fake_run(runs / "a")
    fake_run(runs / "seeds" / "s1", best=0.5)
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "history.json").write_text("[]")
    done = run_results(runs)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.strip().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| a", "| b", "| s1"]  # sorted by path, unfinished skipped
    assert [r.split(" | ")[2] for r in rows] == ["0.7500", "0.6250", "0.5000"]
    done = run_results(runs / "unfinished")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "holds no finished run: no summary.json in it or in any folder below it" in done.stderr
    done = run_results(tmp_path / "absent")
    assert done.returncode == 2 and "absent' not found" in done.stderr


def test_results_damaged_summary_named_run_is_one_line_folder_of_runs_skips_it(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "a")
    bad = fake_run(runs / "bad")
    (bad / "summary.json").write_text("{")  # cut short
    fake_run(runs / "c", best=0.5)
    done = run_results(bad)  # named: one line naming the file, no table
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"'{bad / 'summary.json'}' is damaged (JSONDecodeError" in done.stderr
    done = run_results(runs)  # a folder of runs: the damaged one skipped with one warning, the rest listed
    assert done.returncode == 0, done.stderr
    assert [r.split(" | ")[0] for r in done.stdout.strip().splitlines()[2:]] == ["| a", "| c"]
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"imgclf_jax.results: warning: skipped '{bad}'")
    # Valid JSON without the keys read (best_epoch) is damaged too: one line, no KeyError traceback.
    (bad / "summary.json").write_text('{"num_params": 3}')
    done = run_results(bad)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"'{bad}' has a damaged summary.json or history.json (KeyError: 'best_epoch')" in done.stderr


def test_results_given_a_summary_file_names_the_workdir(tmp_path):
    run = fake_run(tmp_path / "a")
    done = run_results(run / "summary.json")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"'{run / 'summary.json'}' is a file; give the run's workdir (the folder holding summary.json, " \
           f"here '{run}')" in done.stderr
    assert "not found" not in done.stderr


def test_soft_vote_averages_probability_columns_matched_by_name(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("image_id,label,cat,dog\nx,cat,0.6,0.4\ny,dog,0.3,0.7\nz,cat,0.5,0.5\n")
    b = tmp_path / "b.csv"  # columns in the other order, rows too
    b.write_text("image_id,label,dog,cat\nz,cat,0.5,0.5\nx,dog,0.8,0.2\ny,dog,0.9,0.1\n")
    out = tmp_path / "m.csv"
    done = run(a, b, "--soft", "--probabilities", "--out", out)
    assert done.returncode == 0, done.stderr
    # x: cat (0.6+0.2)/2 = 0.4, dog 0.6 -> dog; y: cat 0.2, dog 0.8; z: a tie 0.5/0.5 -> the first column, cat
    assert out.read_text() == "image_id,label,cat,dog\nx,dog,0.4,0.6\ny,dog,0.2,0.8\nz,cat,0.5,0.5\n"
    assert run(a, b, "--soft", "--out", out).returncode == 0
    assert out.read_text() == "image_id,label\nx,dog\ny,dog\nz,cat\n"
    # The majority vote reads the same files by their labels only: x is a tie -> a's cat.
    assert run(a, b, "--out", out).returncode == 0
    assert out.read_text() == "image_id,label\nx,cat\ny,dog\nz,cat\n"


def test_soft_vote_errors_name_file_line_and_column(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("image_id,label,cat,dog\nx,cat,0.6,0.4\ny,dog,0.3,0.7\n")

    def fails(text, *flags):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        done = run(a, bad, "--soft", *flags, "--out", tmp_path / "m.csv")
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "m.csv").exists()
        return done.stderr

    assert "bad.csv' has no probability columns" in fails("image_id,label\nx,cat\ny,dog\n")
    assert "bad.csv' line 3, column 'dog': 'high' is not a probability" in fails(
        "image_id,label,cat,dog\nx,cat,0.5,0.5\ny,dog,0.3,high\n")
    assert "line 2, column 'cat': 'nan' is not a probability" in fails("image_id,cat,dog\nx,nan,0.5\ny,0.3,0.7\n")
    assert "line 2, column 'dog': an empty cell is not a probability" in fails("image_id,cat,dog\nx,1\ny,0.3,0.7\n")
    assert "line 3: the probabilities sum to 1.5, not 1" in fails("image_id,cat,dog\nx,0.5,0.5\ny,0.7,0.8\n")
    assert "line 2, column 'cat': '-0.1' is not a probability" in fails("image_id,cat,dog\nx,-0.1,1.1\ny,0.3,0.7\n")
    assert "other class columns than" in fails("image_id,cat,cow\nx,0.5,0.5\ny,0.3,0.7\n")
    assert "has other ids than" in fails("image_id,cat,dog\nx,0.5,0.5\nw,0.3,0.7\n")
    assert "column 'cat' appears twice" in fails("image_id,cat,cat\nx,0.5,0.5\ny,0.3,0.7\n")
    done = run(a, a, "--probabilities", "--out", tmp_path / "m.csv")
    assert done.returncode == 2 and "give --soft too" in done.stderr
