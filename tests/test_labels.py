"""Labels and splits as declared (issue 13): declared classes, split folder names, where each split came from."""

import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import data_config, read_rows
from imgclf_jax import config as config_lib
from imgclf_jax.data import builders, splits
from imgclf_jax.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tree(root: pathlib.Path, per_class: dict[str, int], flat: int = 0) -> None:
    """Class folders of tiny PNGs under `root` (`flat` > 0: that many images directly in `root` instead)."""
    rng = np.random.default_rng(len(str(root)))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(flat):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / f"t{i}.png")
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / name / f"i{i}.png")


# ----------------------------------------------------------------------------- point 4: declared classes


def test_label_outside_declared_classes_stops_naming_line_and_id(small_competition, tmp_path, cache_dir):
    root = tmp_path / "seven"
    shutil.copytree(small_competition, root)
    lines = (root / "train.csv").read_text().splitlines()
    image_id = lines[6].split(",")[0]
    lines[6] = f"{image_id},7"  # file line 7 (the header is line 1)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    ml1 = config_lib.load_config_file(str(ROOT / "configs/ml1.py"))
    assert ml1.data.num_classes == 5
    data = data_config("competition", root, cache_dir, num_classes=ml1.data.num_classes)
    expected = (f"CSV file '{root / 'train.csv'}' line 7: label 7 of image '{image_id}' is outside 0..4 "
                "(data.num_classes=5)")
    with pytest.raises(DataError) as caught:
        splits.load_run_data(data)
    assert str(caught.value) == expected
    assert not pathlib.Path(cache_dir).exists()  # stopped in the scan: nothing prepared, nothing trained

    # num_classes=0 keeps today's inference: 8 classes (5, 6 empty: a warning names them).
    inferred = builders.prepare("competition", str(root), cache_dir, num_classes=0)
    assert inferred.class_names == [str(k) for k in range(8)]
    assert inferred.splits["train"].labels.max() == 7

    lines[6] = f"{image_id},-1"
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"train.csv' line 7: label -1 of image '{image_id}' is negative"):
        builders.prepare("competition", str(root), cache_dir, num_classes=0)


def test_folders_class_count_must_match_declared_classes(tmp_path, cache_dir):
    root = tmp_path / "three"
    tree(root / "train", {"a": 2, "b": 2, "c": 2})
    assert builders.prepare("folders", str(root), cache_dir, num_classes=3).class_names == ["a", "b", "c"]
    assert builders.prepare("folders", str(root), cache_dir, num_classes=0).class_names == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"data.num_classes=5 but '.*train' has 3 class folders \(a, b, c\): "
                                        r"set --config.data.num_classes=3, or 0"):
        builders.prepare("folders", str(root), cache_dir, num_classes=5)


# ----------------------------------------------------------------------------- point 3: split folder names


@pytest.mark.parametrize("name", ["val", "valid", "validation", "Val", "VALIDATION"])
def test_folders_use_a_validation_tree_of_any_usual_name(tmp_path, cache_dir, name):
    root = tmp_path / "data"
    tree(root / "train", {"cat": 5, "dog": 4})
    tree(root / name, {"cat": 2, "dog": 3})
    prepared = builders.prepare("folders", str(root), cache_dir)
    assert prepared.splits["validation"].labels.tolist() == [0, 0, 1, 1, 1]
    assert prepared.splits["validation"].image_ids == ["cat/i0", "cat/i1", "dog/i0", "dog/i1", "dog/i2"]
    data = splits.make_run_data(prepared, data_config("folders", root, cache_dir))
    assert (len(data.train), len(data.validation)) == (9, 5)  # nothing of train/ held out
    assert data.sources == {"train": "9 images from train/", "validation": f"5 images from {name}/"}


def test_folders_two_validation_trees_are_an_error_naming_both(tmp_path, cache_dir):
    root = tmp_path / "data"
    tree(root / "train", {"a": 2})
    tree(root / "val", {"a": 1})
    tree(root / "validation", {"a": 1})
    with pytest.raises(DataError, match=r"has two validation folders, 'val/' and 'validation/'"):
        builders.prepare("folders", str(root), cache_dir)


def test_folders_test_flat_is_unlabeled_and_test_tree_is_labelled(tmp_path, cache_dir):
    flat = tmp_path / "flat"
    tree(flat / "train", {"a": 2, "b": 2})
    tree(flat / "val", {"a": 1, "b": 1})
    tree(flat / "test", {}, flat=3)
    prepared = builders.prepare("folders", str(flat), cache_dir)
    assert prepared.splits["test"].image_ids == ["t0", "t1", "t2"]
    assert prepared.splits["test"].labels.tolist() == [-1, -1, -1]
    assert splits.make_run_data(prepared, data_config("folders", flat, cache_dir)).sources["test"] == (
        "3 images from test/ (unlabeled)")

    # A labelled test/ tree with no validation tree is the validation split (nothing held out of train/).
    as_val = tmp_path / "as_val"
    tree(as_val / "train", {"a": 3, "b": 3})
    tree(as_val / "Test", {"a": 1, "b": 2})
    prepared = builders.prepare("folders", str(as_val), cache_dir)
    assert "test" not in prepared.splits and prepared.splits["validation"].labels.tolist() == [0, 1, 1]
    data = splits.make_run_data(prepared, data_config("folders", as_val, cache_dir))
    assert len(data.train) == 6 and data.test is None
    assert data.sources["validation"].startswith("3 images from Test/ (a class tree; used as validation")

    # With a validation tree too, test/ is a labelled test split (predicted into submission.csv).
    both = tmp_path / "both"
    tree(both / "train", {"a": 3, "b": 3})
    tree(both / "valid", {"a": 1, "b": 1})
    tree(both / "test", {"a": 2, "b": 1})
    prepared = builders.prepare("folders", str(both), cache_dir)
    assert prepared.splits["test"].labels.tolist() == [0, 0, 1]
    assert prepared.splits["test"].image_ids == ["a/i0", "a/i1", "b/i0"]
    assert splits.make_run_data(prepared, data_config("folders", both, cache_dir)).sources == {
        "train": "6 images from train/", "validation": "2 images from valid/",
        "test": "3 images from test/ (a class tree: labelled)"}


def test_folders_layout_errors_are_one_line(tmp_path, cache_dir, capfd):
    mixed = tmp_path / "mixed"
    tree(mixed / "train", {"a": 2})
    tree(mixed / "test", {"a": 1}, flat=1)
    with pytest.raises(DataError, match=r"test folder '.*test' holds both images and subfolders"):
        builders.prepare("folders", str(mixed), cache_dir)

    no_train = tmp_path / "no_train"  # class folders beside val/: 'val' is not taken for a class
    tree(no_train, {"a": 2, "b": 2, "val": 2})
    with pytest.raises(DataError, match=r"has a 'val/' folder but no train/"):
        builders.prepare("folders", str(no_train), cache_dir)

    differ = tmp_path / "differ"
    tree(differ / "train", {"a": 2, "b": 2})
    tree(differ / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"class folders differ: .* has \['a', 'b'\], .*val' has \['a', 'c'\]"):
        builders.prepare("folders", str(differ), cache_dir)

    extra = tmp_path / "extra"
    tree(extra / "train", {"a": 2, "b": 2})
    tree(extra / "val", {"a": 1, "b": 1})
    tree(extra / "unused", {"a": 1})
    prepared = builders.prepare("folders", str(extra), cache_dir)
    assert set(prepared.splits) == {"train", "validation"}
    assert "warning: ignored folder(s) under" in capfd.readouterr().err


def test_held_out_and_subset_sources(tmp_path, cache_dir, small_competition):
    root = tmp_path / "pets"
    tree(root, {"cat": 10, "dog": 10})
    prepared = builders.prepare("folders", str(root), cache_dir)
    data = splits.make_run_data(prepared, data_config("folders", root, cache_dir, val_fraction=0.2,
                                                      max_train_examples=10))
    assert data.sources == {
        "train": ("10 images from the class folders (the rest held out for validation; "
                  "a class-balanced subset, data.max_train_examples=10)"),
        "validation": ("4 images from the class folders (20% held out by data.val_fraction=0.2, "
                       "stratified by class, data.split_seed=0)"),
    }
    prepared = builders.prepare("competition", str(small_competition), cache_dir)
    data = splits.make_run_data(prepared, data_config("competition", small_competition, cache_dir))
    n_train, n_val = (len(read_rows(small_competition / f"{s}.csv")) for s in ("train", "validation"))
    assert data.sources == {"train": f"{n_train} images from train.csv + train/",
                            "validation": f"{n_val} images from validation.csv + validation/"}


def test_digits_sources(cache_dir):
    prepared = builders.prepare("digits", "", cache_dir)
    data = splits.make_run_data(prepared, data_config("digits", "", cache_dir, val_fraction=0.2))
    assert data.sources["train"] == "1,437 images from scikit-learn's bundled 8x8 digits (the rest held out for validation)"
    assert data.sources["validation"].startswith("360 images from scikit-learn's bundled 8x8 digits (20% held out")


# ----------------------------------------------------------------------------- point 12: the wrong builder


def test_competition_builder_on_a_class_tree_points_to_folders(tmp_path, cache_dir, small_competition):
    for root in (tmp_path / "flat_tree", tmp_path / "split_tree"):
        tree(root if root.name == "flat_tree" else root / "train", {"cat": 2, "dog": 2})
        with pytest.raises(DataError, match=r"has no train.csv but class folders \(cat, dog\) .*"
                                            r"use --config.data.builder=folders"):
            builders.prepare("competition", str(root), cache_dir)
    # A competition folder that only lacks its CSV still gets the plain message.
    broken = tmp_path / "no_csv"
    shutil.copytree(small_competition, broken)
    (broken / "train.csv").unlink()
    with pytest.raises(DataError, match=r"CSV file '.*train.csv' not found$"):
        builders.prepare("competition", str(broken), cache_dir)


# ----------------------------------------------------------------------------- found by a tester


def test_one_class_is_refused(tmp_path, cache_dir):
    tree(tmp_path / "one" / "train", {"a": 3})
    with pytest.raises(DataError, match=r"has 1 class \(a\): a classifier needs at least 2"):
        splits.load_run_data(data_config("folders", tmp_path / "one", cache_dir))


def test_val_fraction_beside_a_validation_tree_is_refused_not_ignored(tmp_path, cache_dir):
    root = tmp_path / "f"
    tree(root / "train", {"a": 4, "b": 4})
    tree(root / "val", {"a": 2, "b": 2})
    assert len(splits.load_run_data(data_config("folders", root, cache_dir)).validation) == 4  # default: fine
    with pytest.raises(config_lib.ConfigError,
                       match=r"'data.val_fraction' \(0.3\) is not used: the data has its own validation split"):
        splits.load_run_data(data_config("folders", root, cache_dir, val_fraction=0.3))


@pytest.mark.parametrize("text", ["1_0", "+3", "٣", "3.0", ""])  # (cells are stripped: " 3" is 3)
def test_labels_are_plain_integers(small_competition, tmp_path, cache_dir, text):
    root = tmp_path / "c"
    shutil.copytree(small_competition, root)
    lines = (root / "train.csv").read_text().splitlines()
    image_id = lines[1].split(",")[0]
    lines[1] = f"{image_id},{text}"
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="train.csv' line 2: label .* is not an integer|line 2: .*label"):
        splits.load_run_data(data_config("competition", root, cache_dir, num_classes=5))


def test_competition_test_split_labels_and_missing_csv(small_competition, tmp_path, cache_dir, capfd):
    root = tmp_path / "c"
    shutil.copytree(small_competition, root)
    shutil.copytree(root / "validation", root / "test")
    splits.load_run_data(data_config("competition", root, cache_dir, num_classes=5))
    assert "exists but there is no test.csv: no test split" in capfd.readouterr().err
    rows = read_rows(root / "validation.csv")
    (root / "test.csv").write_text("image_id,label\n" + "".join(f"{i},{y}\n" for i, y in rows))
    data = splits.load_run_data(data_config("competition", root, cache_dir, num_classes=5))
    assert list(data.test.labels) == [y for _, y in rows]  # a labelled test split: scored at the end
    (root / "test.csv").write_text("image_id,label\n" + "".join(f"{i},\n" for i, _ in rows))
    assert (splits.load_run_data(data_config("competition", root, cache_dir, num_classes=5)).test.labels == -1).all()


def test_a_labelled_test_tree_is_scored_in_the_summary(tmp_path):
    from imgclf_jax import loop

    root = tmp_path / "f"
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        for k, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(root / split / f"c{k}" / f"{i}.png")
    c = config_lib.load_config_file(str(ROOT / "configs/folders.py"))
    overrides = {"data.dir": root, "data.cache_dir": tmp_path / "cache", "data.image_size": 8,
                 "model.conv_filters": "(4,)", "model.conv_kernel_sizes": "(3,)", "model.conv_paddings": "same",
                 "model.conv_pools": "(True,)", "model.conv_dropouts": "(0.0,)", "model.dense_units": "(8,)",
                 "model.dense_dropouts": "(0.0,)", "train.num_epochs": 8, "optimizer.learning_rate": 0.05,
                 "train.early_stopping.monitor": ""}
    for key, value in overrides.items():
        config_lib.apply_override(c, key, str(value))
    summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
    predicted = [row.split(",")[1] for row in (tmp_path / "run" / "submission.csv").read_text().splitlines()[1:]]
    ids = [row.split(",")[0] for row in (tmp_path / "run" / "submission.csv").read_text().splitlines()[1:]]
    truth = [i.split("/")[0] for i in ids]  # test ids are <class>/<stem>
    assert summary["num_test_examples"] == 6
    assert summary["test_accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]))


def test_confusion_matrix_names_keep_their_ends():
    from imgclf_jax.report import _wrap

    a, b = (_wrap(f"photos_from_the_north_camera_collected_in_2024_{x}") for x in ("cat", "dog"))
    assert a != b and a.endswith("2024_cat") and a.count("\n") == 2 and "…" in a
    assert _wrap("short") == "short" and _wrap("exactly_fourteen_") == "exactly_fourte\nen_"
