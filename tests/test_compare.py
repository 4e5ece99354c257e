"""compare: one self-contained page with the runs' table (differing config keys only), curves, matrices."""

import base64
import html
import io
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_compare(*args):
    return subprocess.run([sys.executable, "-m", "imgclf_jax.compare", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def make_run(folder, config, history, summary=None, confusion=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "history.json").write_text(json.dumps(history))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if confusion is not None:
        (folder / "confusion_matrix.json").write_text(json.dumps(
            {"class_names": ["cat", "dog"], "rows": "true class", "columns": "predicted class", "counts": confusion}))
    return folder


def epoch(e, val_accuracy, val_loss, seconds=30.0, **extra):
    return {"epoch": e, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": val_loss,
            "val_accuracy": val_accuracy, "learning_rate": 0.1, "seconds": seconds, **extra}


def config(lr, seed=0, members=1):
    return {"seed": seed, "optimizer": {"name": "sgd", "learning_rate": lr},
            "ensemble": {"num_members": members, "vote": "majority"}, "data": {"num_workers": 0}}


def table_rows(text):
    """The table as lists of cell texts (header first)."""
    table = text[text.index("<table>"):text.index("</table>")]
    return [[html.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", tr)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table)]


@pytest.fixture
def runs(tmp_path):
    base = tmp_path / "runs"
    make_run(base / "a", config(0.1), [epoch(1, 0.70, 0.9), epoch(2, 0.80, 0.6), epoch(3, 0.75, 0.7)],
             {"best_epoch": 2, "result_val_accuracy": 0.80, "train_images_per_s": 123.4}, [[3, 1], [1, 5]])
    make_run(base / "b", config(0.01), [epoch(1, 0.60, 1.0, seconds=90), epoch(2, 0.65, 0.8, seconds=90)],
             {"best_epoch": 2, "result_val_accuracy": 0.65, "train_images_per_s": 100.0}, [[2, 2], [1, 5]])
    ens = [{"epoch": e, "train_loss": [1.0, 1.1], "train_accuracy": [0.5, 0.5], "val_loss": [0.9, 0.8],
            "val_accuracy": [a0, a1], "learning_rate": [0.1, 0.1], "trained": [True, True],
            "majority_val_accuracy": m, "soft_val_accuracy": s, "seconds": 40.0}
           for e, a0, a1, m, s in ((1, 0.6, 0.7, 0.65, 0.66), (2, 0.8, 0.75, 0.82, 0.84))]
    make_run(base / "e", config(0.1, seed=5, members=2), ens,
             {"members": [{"seed": 5, "best_epoch": 2, "result_val_accuracy": 0.8, "epochs_trained": 2},
                          {"seed": 6, "best_epoch": 2, "result_val_accuracy": 0.75, "epochs_trained": 2}],
              "vote": {"majority": {"val_accuracy": 0.82}, "soft": {"val_accuracy": 0.84}},
              "member_images_per_s": 200.0}, [[4, 0], [1, 5]])
    make_run(base / "live", config(0.3), [epoch(1, 0.55, 1.2, train_images_per_s=50.0)])  # no summary yet
    return base


def test_page_table_shows_only_differing_keys_and_the_figures(runs, tmp_path):
    out = tmp_path / "report.html"
    done = run_compare(runs, "--out", out)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    rows = table_rows(text)
    assert rows[0] == ["run", "ensemble.num_members", "optimizer.learning_rate", "seed", "best val acc", "best epoch",
                       "result val acc", "epochs", "wall time", "train img/s"]  # not optimizer.name, data.*
    assert rows[1] == ["a", "1", "0.1", "0", "0.8000", "2", "0.8000", "3", "1.5 min", "123.4"]
    assert rows[2] == ["b", "1", "0.01", "0", "0.6500", "2", "0.6500", "2", "3.0 min", "100.0"]
    assert rows[3] == ["e member 0", "2", "0.1", "5", "0.8000", "2", "0.8000", "2", "1.3 min", "200.0"]
    assert rows[4] == ["e member 1", "2", "0.1", "6", "0.7500", "2", "0.7500", "2", "1.3 min", "200.0"]
    assert rows[5] == ["e majority vote", "2", "0.1", "[5, 6]", "0.8200", "2", "0.8200", "2", "1.3 min", "200.0"]
    assert rows[6] == ["e soft vote", "2", "0.1", "[5, 6]", "0.8400", "2", "0.8400", "2", "1.3 min", "200.0"]
    assert rows[7] == ["live (running)", "1", "0.3", "0", "0.5500", "1", "-", "1", "30.0 s", "50.0"]
    assert "<b>0.8400</b>" in text  # the best row's best figure is bold
    # Self-contained: the images are data URIs, nothing is fetched.
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(uris) == 2 + 3  # two curve plots, three confusion matrices (the live run has none yet)
    for uri in uris:
        Image.open(io.BytesIO(base64.b64decode(uri))).verify()
    assert re.findall(r'<figure data-run="([^"]+)"', text) == ["a", "b", "e", "live"]
    assert "(no confusion_matrix.json yet)" in text
    assert 'alt="confusion matrix of e"' in text


def test_curves_overlay_every_run(runs, tmp_path):
    from imgclf_jax import compare

    loaded = [compare.load_run(str(runs / n), n) for n in ("a", "e")]
    images = compare.curve_images(loaded)
    for uri in images.values():
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
        assert picture.shape == (420, 640, 3)
        assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 20  # drawn, not blank


def test_one_run_no_differing_keys_and_the_errors(runs, tmp_path):
    out = tmp_path / "one.html"
    done = run_compare(runs / "a", "--out", out)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert table_rows(text)[0][:2] == ["run", "best val acc"] and "(none: the runs share their config)" in text

    def fails(*args):
        done = run_compare(*args)
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    (tmp_path / "empty").mkdir()
    assert "holds no run: no history.json" in fails(tmp_path / "empty", "--out", out)
    assert "would overwrite the run's own file summary.json" in fails(runs / "a", "--out", runs / "a" / "summary.json")
    (runs / "b" / "history.json").write_text("[{")
    assert f"'{runs / 'b' / 'history.json'}' is damaged" in fails(runs / "b", "--out", out)
    (runs / "b" / "history.json").write_text(json.dumps([{"epoch": 1}]))
    assert f"'{runs / 'b'}' has a damaged summary.json or history.json" in fails(runs / "b", "--out", out)
    (runs / "a" / "config.json").unlink()
    assert f"'{runs / 'a'}' has no config.json" in fails(runs / "a", "--out", out)
    assert "--out" in fails(runs / "e")
    assert "unknown flag --bogus" in fails(runs / "e", "--bogus", "--out", out)


def test_a_real_digits_run_and_its_ensemble(tmp_path):
    """compare reads what train writes: a single run and a 2-member ensemble of digits, one epoch each."""
    cache = tmp_path / "cache"
    for name, extra in (("single", []), ("pair", ["--config.ensemble.num_members=2"])):
        done = subprocess.run([sys.executable, "-m", "imgclf_jax.train", "--config", "configs/digits.py",
                               "--config.train.num_epochs=1", "--config.data.max_train_examples=300",
                               "--config.data.max_val_examples=100", f"--config.data.cache_dir={cache}",
                               "--workdir", str(tmp_path / "runs" / name), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "report.html"
    done = run_compare(tmp_path / "runs" / "single", tmp_path / "runs" / "pair", "--out", out)
    assert done.returncode == 0, done.stderr
    rows = table_rows(out.read_text())
    assert [r[0] for r in rows[1:]] == ["single", "pair member 0", "pair member 1", "pair majority vote",
                                       "pair soft vote"]
    summary = json.loads((tmp_path / "runs" / "pair" / "summary.json").read_text())
    header = rows[0]
    soft = dict(zip(header, rows[5]))
    assert soft["result val acc"] == f"{summary['vote']['soft']['val_accuracy']:.4f}"
    assert "ensemble.num_members" in header and "seed" in header
    single = dict(zip(header, rows[1]))
    history = json.loads((tmp_path / "runs" / "single" / "history.json").read_text())
    assert single["best val acc"] == f"{history[0]['val_accuracy']:.4f}" and single["epochs"] == "1"
