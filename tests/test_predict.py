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


def run_vote(*args):
    return subprocess.run([sys.executable, "-m", "imgclf_jax.vote", *map(str, args)],
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
    # validation.csv has labels ('0'..'4', the run's class names): the printed accuracy is the run's.
    correct = round(summary["result_val_accuracy"] * len(truth))
    assert f"accuracy {summary['result_val_accuracy']:.4f} ({correct} of {len(truth)} images)" in done.stdout


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


# ------------------------------------------------ labelled images: a digits run, class-folder trees


def digits_tree(root, count=30):
    """The first `count` sklearn digits as 32x32 RGB PNGs in root/<digit>/d<i>.png, as the digits builder
    renders them (bilinear upscaling): the run's own evaluation input. Returns {id: true digit}."""
    import numpy as np
    from PIL import Image

    from imgclf_jax.data.scan import digits_arrays

    images, labels = digits_arrays()
    truth = {}
    for i in range(count):
        big = np.asarray(Image.fromarray(images[i]).resize((32, 32), Image.Resampling.BILINEAR))
        (root / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(big[..., None], 3, axis=-1)).save(root / str(labels[i]) / f"d{i}.png")
        truth[f"{labels[i]}/d{i}"] = str(labels[i])
    return truth


def train_digits(workdir, cache, *extra):
    done = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/digits.py", "--config.train.num_epochs=1",
         "--config.data.max_train_examples=200", "--config.data.max_val_examples=100",
         f"--config.data.cache_dir={cache}", "--workdir", str(workdir), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 1-epoch digits run (200 training images, ~0.7 validation accuracy: errors to count) and a tree."""
    tmp = tmp_path_factory.mktemp("digits_predict")
    truth = digits_tree(tmp / "tree")
    return train_digits(tmp / "run", tmp / "cache"), tmp / "tree", truth, tmp / "cache"


def parse_table(stdout):
    """(accuracy line, {class: (accuracy text, correct, images)}, confusion rows {class: [counts]})."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("accuracy "))
    per_class = {}
    i = head + 2
    while not lines[i].startswith("confusion matrix"):
        name, acc, counts = lines[i].split()
        correct, images = map(int, counts.split("/"))
        per_class[name] = (acc, correct, images)
        i += 1
    header = lines[i + 1].split()
    matrix = {}
    for line in lines[i + 2: i + 2 + len(header)]:
        name, *counts = line.split()
        matrix[name] = list(map(int, counts))
    return lines[head], per_class, header, matrix


def test_predict_a_class_folder_tree_prints_accuracy_and_confusion(digits_run, tmp_path):
    workdir, tree, truth, _ = digits_run
    out = tmp_path / "preds" / "tree.csv"
    done = run_predict("--workdir", workdir, "--images", tree, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv_rows(out)
    assert rows[0] == ["image_id", "label"] and [r[0] for r in rows[1:]] == sorted(truth)  # ids <class>/<stem>
    predicted = dict(map(tuple, rows[1:]))
    correct = sum(predicted[i] == truth[i] for i in truth)
    assert 0 < correct < len(truth)  # a 1-epoch run: right and wrong answers, so the counts mean something
    first, per_class, header, matrix = parse_table(done.stdout)
    assert first == f"accuracy {correct / len(truth):.4f} ({correct} of {len(truth)} images)"
    names = [str(d) for d in range(10)]
    assert header == names and list(per_class) == names
    for name in names:  # by hand from the written predictions and the folder names
        ids = [i for i in truth if truth[i] == name]
        right = sum(predicted[i] == name for i in ids)
        assert per_class[name] == (f"{right / len(ids):.4f}", right, len(ids))
        assert matrix[name] == [sum(predicted[i] == col for i in ids) for col in names]
    saved = json.loads((tmp_path / "preds" / "tree_confusion_matrix.json").read_text())
    assert saved["class_names"] == names and saved["counts"] == [matrix[n] for n in names]
    assert (tmp_path / "preds" / "tree_confusion_matrix.png").stat().st_size > 0

    # The same images as a CSV with a label column (in another order) give the same table.
    flat = tmp_path / "flat"
    flat.mkdir()
    for image_id in truth:
        (flat / image_id.replace("/", "_")).with_suffix(".png").write_bytes((tree / f"{image_id}.png").read_bytes())
    order = sorted(truth, reverse=True)
    (tmp_path / "flat.csv").write_text("image_id,label\n" + "".join(
        f"{i.replace('/', '_')},{truth[i]}\n" for i in order))
    done = run_predict("--workdir", workdir, "--images", tmp_path / "flat.csv", "--out", tmp_path / "flat_out.csv")
    assert done.returncode == 0, done.stderr[-3000:]
    assert parse_table(done.stdout) == (first, per_class, header, matrix)
    # A blank label column (a test.csv with the header only) is unlabelled: no table.
    (tmp_path / "blank.csv").write_text("image_id,label\n" + "".join(f"{i.replace('/', '_')},\n" for i in order))
    done = run_predict("--workdir", workdir, "--images", tmp_path / "blank.csv", "--image_dir", flat,
                       "--out", tmp_path / "b.csv")
    assert done.returncode == 0 and "accuracy" not in done.stdout


def test_labels_outside_the_runs_classes_are_one_line_errors(digits_run, tmp_path):
    workdir, tree, truth, _ = digits_run

    def fails(*args):
        done = run_predict("--workdir", workdir, "--out", tmp_path / "x.csv", *args)
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "x.csv").exists()  # refused before predicting
        return done.stderr

    small = tmp_path / "tree"
    (small / "3").mkdir(parents=True)
    (small / "cat").mkdir()
    (small / "3" / "a.png").write_bytes((tree / "3" / "d3.png").read_bytes())
    (small / "cat" / "b.png").write_bytes((tree / "4" / "d4.png").read_bytes())
    err = fails("--images", small)
    assert f"class folder '{small / 'cat'}' is not one of the run's 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in err
    (small / "stray.png").write_bytes((tree / "4" / "d4.png").read_bytes())
    assert "holds both images and subfolders (3, cat)" in fails("--images", small)

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.png").write_bytes((tree / "3" / "d3.png").read_bytes())
    (tmp_path / "t" / "b.png").write_bytes((tree / "4" / "d4.png").read_bytes())
    (tmp_path / "t.csv").write_text("image_id,label\na,3\nb,seven\n")
    assert "CSV file '" + str(tmp_path / "t.csv") + "' line 3: label 'seven' is not one of the run's" in fails(
        "--images", tmp_path / "t.csv")
    (tmp_path / "t.csv").write_text("image_id,label\na,3\nb,\n")
    assert "t.csv' line 3: empty label (other rows have labels" in fails("--images", tmp_path / "t.csv")
    err = fails("--images", tmp_path / "t", "--config", "configs/digits.py")
    assert "predict takes no --config: it reads the run's config from --workdir" in err
    assert "--members needs an ensemble run" in fails("--images", tmp_path / "t", "--members")


def test_members_writes_each_members_predictions(digits_run, tmp_path):
    single, tree, truth, cache = digits_run
    ensemble = train_digits(tmp_path / "ens", cache, "--config.ensemble.num_members=2")
    names = [str(d) for d in range(10)]
    # --members --probabilities: each member file carries its label and softmax, the vote file the members'
    # mean beside the majority vote's label.
    out = tmp_path / "out" / "vote.csv"
    done = run_predict("--workdir", ensemble, "--images", tree, "--out", out, "--members", "--probabilities")
    assert done.returncode == 0, done.stderr[-3000:]
    labels, tables = [], []
    for path in (out, tmp_path / "out" / "vote_member_0.csv", tmp_path / "out" / "vote_member_1.csv"):
        rows = read_csv_rows(path)
        assert rows[0] == ["image_id", "label", *names] and [r[0] for r in rows[1:]] == sorted(truth)
        labels.append({r[0]: r[1] for r in rows[1:]})
        tables.append(np.array([[float(p) for p in r[2:]] for r in rows[1:]]))
        np.testing.assert_allclose(tables[-1].sum(1), 1.0, atol=1e-5)
    vote, m0, m1 = labels
    for table, member in zip(tables[1:], (m0, m1)):  # each member's label is its own argmax
        assert [names[k] for k in table.argmax(1)] == [member[i] for i in sorted(truth)]
    np.testing.assert_allclose(tables[0], (tables[1] + tables[2]) / 2, atol=1e-6)
    assert any(m0[i] != m1[i] for i in truth)  # two different models
    assert all(vote[i] == m0[i] for i in truth if m0[i] == m1[i])  # where they agree, so does the vote
    accs = [sum(m[i] == truth[i] for i in truth) / len(truth) for m in (m0, m1)]
    assert f"member accuracies: {accs[0]:.4f}, {accs[1]:.4f}" in done.stdout
    # Member 0 is the plain run with the same seed: the plain run's --probabilities file has member 0's
    # labels, each row its softmax, the label its argmax.
    plain = tmp_path / "plain.csv"
    assert run_predict("--workdir", single, "--images", tree, "--out", plain, "--probabilities").returncode == 0
    rows = read_csv_rows(plain)
    assert rows[0] == ["image_id", "label", *names] and [r[0] for r in rows[1:]] == sorted(truth)
    assert {r[0]: r[1] for r in rows[1:]} == m0
    table = np.array([[float(p) for p in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(table, tables[1], atol=1e-5)
    # A soft vote of the member files is the argmax of their mean.
    soft = tmp_path / "soft.csv"
    done = run_vote(tmp_path / "out" / "vote_member_0.csv", tmp_path / "out" / "vote_member_1.csv", "--soft",
                    "--out", soft)
    assert done.returncode == 0, done.stderr
    assert [r[1] for r in read_csv_rows(soft)[1:]] == [names[k] for k in tables[0].argmax(1)]
    # Without --members (or --probabilities) only the vote's file, with the same labels.
    done = run_predict("--workdir", ensemble, "--images", tree, "--out", tmp_path / "only" / "v.csv")
    assert done.returncode == 0 and sorted(p.name for p in (tmp_path / "only").iterdir()) == [
        "v.csv", "v_confusion_matrix.json", "v_confusion_matrix.png"]
    assert read_csv_rows(tmp_path / "only" / "v.csv") == [["image_id", "label"], *map(list, sorted(vote.items()))]


# ------------------------------------------------ outputs that would overwrite inputs or the run's files


def test_check_outputs_refuses_inputs_images_folders_and_run_files(tmp_path):
    import os

    from imgclf_jax.errors import ConfigError
    from imgclf_jax.predict import check_outputs, list_images

    pixels = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "flat").mkdir()
    for name in ("a", "b"):
        pixels.save(tmp_path / "flat" / f"{name}.png")
    (tmp_path / "t.csv").write_text("image_id\nb\na\n")
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    pixels.save(tmp_path / "tree" / "cat" / "c.png")
    work = tmp_path / "w"
    (work / "checkpoints" / "result").mkdir(parents=True)
    (work / "config.json").write_text("{}")
    os.link(tmp_path / "flat" / "a.png", tmp_path / "hard.png")  # another name for an input image

    def refused(out, images, image_dir=None):
        listed = list_images(str(images), image_dir and str(image_dir))
        with pytest.raises(ConfigError) as caught:
            check_outputs([str(out)], listed, str(images), image_dir and str(image_dir), str(work))
        return str(caught.value)

    def allowed(out, images, image_dir=None):
        listed = list_images(str(images), image_dir and str(image_dir))
        check_outputs([str(out)], listed, str(images), image_dir and str(image_dir), str(work))

    flat, csv_file = tmp_path / "flat", tmp_path / "t.csv"
    assert f"would overwrite an input image ('{flat / 'a.png'}')" in refused(flat / "a.png", flat)
    assert "would overwrite an input image" in refused(tmp_path / "flat" / ".." / "flat" / "b.png", flat)
    assert f"would overwrite the input CSV ('{csv_file}')" in refused(csv_file, csv_file, flat)
    assert "would overwrite an input image" in refused(tmp_path / "hard.png", csv_file, flat)  # samefile
    assert f"lies inside the images folder '{flat}'" in refused(flat / "new.csv", flat)
    assert f"lies inside the images folder '{flat}'" in refused(flat / "new.csv", csv_file, flat)
    tree = tmp_path / "tree"
    assert f"lies inside the images folder '{tree}'" in refused(tree / "cat" / "p.csv", tree)
    for name in ("config.json", "history.json", "summary.json", "submission.csv", "submission_member_3.csv",
                 "confusion_matrix.png", "checkpoints/result/x", "checkpoints/new.csv"):
        assert "would overwrite the run's own file" in refused(work / name, flat), name
    allowed(work / "val.csv", flat)  # a new file in the workdir
    allowed(work / "submission_member_x.csv", flat)
    allowed(tmp_path / "out.csv", csv_file, flat)


def test_label_matching_ignores_unicode_normalisation():
    import unicodedata

    from imgclf_jax.errors import DataError
    from imgclf_jax.predict import ImageList, label_indices

    run_names = ["abc", unicodedata.normalize("NFC", "ünï"), "z"]  # as the run recorded them
    nfd = unicodedata.normalize("NFD", "ünï")  # a macOS copy of the class folder
    assert nfd != run_names[1]
    images = ImageList(["x", "y", "w"], ["x.png", "y.png", "w.png"], [nfd, "z", run_names[1]],
                       [f"class folder 't/{nfd}'", "class folder 't/z'", "class folder 't/ünï'"])
    assert label_indices(images, run_names).tolist() == [1, 2, 1]
    # The other way round (a run trained on NFD names) too; an unknown name is still refused.
    assert label_indices(images, ["abc", nfd, "z"]).tolist() == [1, 2, 1]
    with pytest.raises(DataError, match="class folder 't/q' is not one of the run's 3 classes"):
        label_indices(ImageList(["q"], ["q.png"], ["q"], ["class folder 't/q'"]), run_names)


def test_predict_refuses_outputs_over_its_inputs_and_the_run(digits_run, tmp_path):
    import shutil

    workdir, tree, truth, _ = digits_run
    config_before = (workdir / "config.json").read_bytes()

    def refused(*args):
        done = run_predict("--workdir", workdir, *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    assert "would overwrite the run's own file" in refused("--images", tree, "--out", workdir / "config.json")
    assert (workdir / "config.json").read_bytes() == config_before
    image = tree / "3" / "d3.png"
    before = image.read_bytes()
    assert "would overwrite an input image" in refused("--images", tree, "--out", image)
    assert image.read_bytes() == before
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(image, flat / "a.png")
    (tmp_path / "t.csv").write_text("image_id,label\na,3\n")
    assert "would overwrite the input CSV" in refused("--images", tmp_path / "t.csv", "--image_dir", flat,
                                                      "--out", tmp_path / "t.csv")
    # The side file <out stem>_confusion_matrix.json would land on the input CSV (here named so).
    side = tmp_path / "p_confusion_matrix.json"
    side.write_text("image_id,label\na,3\n")
    err = refused("--images", side, "--image_dir", flat, "--out", tmp_path / "p.csv")
    assert f"'{side}' (written beside --out) would overwrite the input CSV" in err and side.read_text() == "image_id,label\na,3\n"
    assert not (tmp_path / "p.csv").exists()
    # A new file in the workdir is fine, with its confusion matrix beside it.
    done = run_predict("--workdir", workdir, "--images", tree, "--out", workdir / "val.csv")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "val_confusion_matrix.json").exists() and (workdir / "config.json").read_bytes() == config_before


def test_predict_names_what_the_workdir_lacks_and_a_damaged_config(digits_run, tmp_path):
    import shutil

    workdir, tree, _, _ = digits_run
    no_result = tmp_path / "no_result"
    no_result.mkdir()
    shutil.copy(workdir / "config.json", no_result / "config.json")
    done = run_predict("--workdir", no_result, "--images", tree, "--out", tmp_path / "x.csv")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"has config.json but no result checkpoint ('{no_result / 'checkpoints' / 'result'}' is missing)" \
        in done.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    (damaged / "config.json").write_text('{"data": ')
    done = run_predict("--workdir", damaged, "--images", tree, "--out", tmp_path / "x.csv")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"'{damaged / 'config.json'}' cannot be read as the run's config (JSONDecodeError" in done.stderr
    assert not (tmp_path / "x.csv").exists()


def test_predict_uses_a_batch_norm_runs_ema_weights_and_statistics(tmp_path):
    """A ResNet run with EMA on a class-folder tree with a labelled test split: predict on the test folder
    restores the result variables (EMA params + BatchNorm statistics) and gives, image by image, the labels
    the run itself wrote to submission.csv from its result weights."""
    import numpy as np
    from PIL import Image

    from imgclf_jax.data.scan import digits_arrays

    images, labels = digits_arrays()
    root = tmp_path / "tree"
    for split, rows in (("train", range(0, 160)), ("validation", range(160, 200)), ("test", range(200, 240))):
        for i in rows:
            big = np.asarray(Image.fromarray(images[i]).resize((32, 32), Image.Resampling.BILINEAR))
            (root / split / str(labels[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(big[..., None], 3, axis=-1)).save(root / split / str(labels[i]) / f"d{i}.png")
    workdir = train_digits(tmp_path / "run", tmp_path / "cache", "--config.data.builder=folders",
                           f"--config.data.dir={root}", "--config.data.max_train_examples=0",
                           "--config.data.max_val_examples=0", "--config.data.val_fraction=0.1",
                           "--config.model.name=resnet",
                           "--config.model.stem_width=8", "--config.model.widths=(8,16)",
                           "--config.model.depths=(1,1)", "--config.model.strides=(1,2)",
                           "--config.train.ema_decay=0.9")
    out = tmp_path / "preds.csv"
    done = run_predict("--workdir", workdir, "--images", root / "test", "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    written = dict(map(tuple, read_csv_rows(workdir / "submission.csv")[1:]))
    predicted = dict(map(tuple, read_csv_rows(out)[1:]))
    assert len(written) == 40 and predicted == written
