"""Dataset builders: real images from ../shared, crafted folders, digits, the cache."""

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from conftest import copy_with_test_split, data_config, find_image, read_rows
from imgclf_jax.data import builders, splits
from imgclf_jax.data.imageio import load_rgb
from imgclf_jax.errors import ConfigError, DataError


def test_competition_real_images_keep_csv_order_and_pixels(small_competition, cache_dir):
    prepared = builders.prepare("competition", str(small_competition), cache_dir)
    assert prepared.class_names == ["0", "1", "2", "3", "4"]
    assert not str(prepared.path).startswith(str(small_competition))
    for split in ("train", "validation"):
        rows = read_rows(small_competition / f"{split}.csv")
        got = prepared.splits[split]
        assert got.image_ids == [image_id for image_id, _ in rows]
        assert got.labels.tolist() == [label for _, label in rows]
        for i in (0, len(rows) // 2, len(rows) - 1):  # stored records, in CSV order, lossless
            record = got.source[i]
            assert record["image_id"].decode() == rows[i][0] and record["label"] == rows[i][1]
            original = np.asarray(Image.open(find_image(small_competition / split, rows[i][0])).convert("RGB"))
            assert record["image"].dtype == np.uint8 and record["image"].shape == (100, 100, 3)
            np.testing.assert_array_equal(record["image"], original)
    exts = {p.suffix for p in (small_competition / "train").iterdir()} | {
        p.suffix for p in (small_competition / "validation").iterdir()}
    assert {".webp", ".png"} <= exts


def test_cache_is_reused_and_changed_data_is_prepared_again(small_competition, cache_dir, tmp_path):
    first = builders.prepare("competition", str(small_competition), cache_dir)
    stamp = os.stat(first.path).st_mtime_ns
    again = builders.prepare("competition", str(small_competition), cache_dir)
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == stamp
    # A copy with one row fewer is another dataset.
    changed = tmp_path / "changed"
    import shutil
    shutil.copytree(small_competition, changed)
    lines = (changed / "train.csv").read_text().splitlines()
    (changed / "train.csv").write_text("\n".join(lines[:-1]) + "\n")
    other = builders.prepare("competition", str(changed), cache_dir)
    assert other.path != first.path and len(other.splits["train"].labels) == len(lines) - 2
    assert not any(name.startswith(".") or ".tmp-" in name for name in os.listdir(cache_dir))


def test_competition_test_split_and_ids_with_extension(small_competition, tmp_path, cache_dir):
    root = tmp_path / "with_test"
    paths = copy_with_test_split(small_competition, root, ["t0", "t1", "t2", "t3"])
    ids = [p.name if i % 2 else p.stem for i, p in enumerate(paths)]  # ids with and without extension
    (root / "test.csv").write_text("\ufeffimage_id\r\n" + "\r\n".join(ids) + "\r\n")  # BOM, CRLF
    prepared = builders.prepare("competition", str(root), cache_dir)
    test = prepared.splits["test"]
    assert test.image_ids == ["t0", "t1", "t2", "t3"] and test.labels.tolist() == [-1] * 4


def test_competition_errors_name_file_and_line(small_competition, tmp_path, cache_dir):
    import shutil
    root = tmp_path / "bad"
    shutil.copytree(small_competition, root)
    csv_path = root / "train.csv"
    good = csv_path.read_text()
    lines = good.splitlines()

    csv_path.write_text("\n".join(lines[:3] + ["nosuchimage,1"] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"train.csv' line 4: no image file for id 'nosuchimage'"):
        builders.prepare("competition", str(root), cache_dir)
    csv_path.write_text("\n".join(lines[:2] + [lines[2].split(",")[0] + ",x"] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"line 3: label 'x' is not an integer"):
        builders.prepare("competition", str(root), cache_dir)
    csv_path.write_text("\n".join(lines[:2] + [lines[1]] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"line 3: duplicate image_id .* \(first on line 2\)"):
        builders.prepare("competition", str(root), cache_dir)
    csv_path.write_text("id,label\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"line 1: missing column\(s\) image_id"):
        builders.prepare("competition", str(root), cache_dir)
    csv_path.write_text("")
    with pytest.raises(DataError, match="is empty"):
        builders.prepare("competition", str(root), cache_dir)
    csv_path.write_text("image_id,label\r\n")
    with pytest.raises(DataError, match="train.csv' has a header but no rows"):
        builders.prepare("competition", str(root), cache_dir)
    csv_path.write_text("\ufeff" + good.replace("\n", "\r\n"))  # BOM and CRLF are read as usual
    assert builders.prepare("competition", str(root), cache_dir).splits["train"].image_ids == [
        line.split(",")[0] for line in lines[1:]]
    csv_path.write_text(good)
    val = root / "validation.csv"
    vlines = val.read_text().splitlines()
    val.write_text("\n".join(vlines[:2] + [vlines[2].split(",")[0] + ",7"] + vlines[3:]) + "\n")
    with pytest.raises(DataError, match=r"validation.csv' line 3: label 7 of image '[^']+' is outside 0..4 "
                                        r"\(inferred from train.csv's largest label; set data.num_classes"):
        builders.prepare("competition", str(root), cache_dir)
    prepared = builders.prepare("competition", str(root), cache_dir, num_classes=8)  # explicit K
    assert prepared.class_names == [str(k) for k in range(8)]


def test_duplicate_ids_with_and_without_extension(small_competition, tmp_path, cache_dir):
    import shutil
    root = tmp_path / "dup"
    shutil.copytree(small_competition, root)
    lines = (root / "train.csv").read_text().splitlines()
    image_id = lines[1].split(",")[0]
    (root / "train.csv").write_text("\n".join(lines + [f"{image_id}.webp,3"]) + "\n")
    with pytest.raises(DataError, match=rf"line {len(lines) + 1}: duplicate image_id '{image_id}' \(first on line 2\)"):
        builders.prepare("competition", str(root), cache_dir)


def test_classes_without_training_rows_are_named_in_a_warning(small_competition, tmp_path, cache_dir, capfd):
    import shutil
    root = tmp_path / "gap"
    shutil.copytree(small_competition, root)
    lines = (root / "train.csv").read_text().splitlines()
    kept = [lines[0]] + [l for l in lines[1:] if not l.endswith(",2")]
    (root / "train.csv").write_text("\n".join(kept) + "\n")
    builders.prepare("competition", str(root), cache_dir)
    assert "warning: 1 of 5 classes have no training rows" in capfd.readouterr().err


def test_cache_inside_data_folder_is_refused(small_competition):
    with pytest.raises(ConfigError, match="lies inside data.dir"):
        builders.prepare("competition", str(small_competition), str(small_competition / "cache"))


def crafted_image(kind: str) -> Image.Image:
    """A 6x5 test image in a given mode and its expected 8-bit RGB pixels."""
    ramp = (np.arange(30).reshape(5, 6) * 8).astype(np.uint8)
    if kind == "gray":
        return Image.fromarray(ramp)
    if kind == "palette":
        return Image.fromarray(np.dstack([ramp, ramp // 2, 255 - ramp])).convert("P", palette=Image.Palette.ADAPTIVE)
    if kind == "rgba":
        return Image.fromarray(np.dstack([ramp, ramp // 2, 255 - ramp, np.full_like(ramp, 9)]))
    if kind == "gray16":
        return Image.fromarray((ramp.astype(np.uint16) * 257).astype(np.uint16))
    if kind == "rgb":
        return Image.fromarray(np.dstack([ramp, ramp, ramp]))
    raise ValueError(kind)


def test_image_modes_become_8bit_rgb(tmp_path):
    ramp = (np.arange(30).reshape(5, 6) * 8).astype(np.uint8)
    for kind in ("gray", "palette", "rgba", "gray16", "rgb"):
        path = tmp_path / f"{kind}.png"
        crafted_image(kind).save(path)
        rgb = load_rgb(path)
        assert rgb.dtype == np.uint8 and rgb.shape == (5, 6, 3), kind
        if kind in ("gray", "gray16", "rgb"):  # 16-bit: v*257 scaled back to v exactly, not clipped to 255
            np.testing.assert_array_equal(rgb, np.dstack([ramp] * 3), err_msg=kind)
        if kind == "rgba":
            np.testing.assert_array_equal(rgb, np.dstack([ramp, ramp // 2, 255 - ramp]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png' cannot be read"):
        load_rgb(tmp_path / "broken.png")


def make_class_folders(root: pathlib.Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (7 + i % 3, 9, 3), dtype=np.uint8)  # mixed sizes
            Image.fromarray(pixels).save(root / name / f"img{i:02d}.{'png' if i % 2 else 'bmp'}")


def test_class_folders_with_stratified_split(tmp_path, cache_dir):
    root = tmp_path / "pets"
    make_class_folders(root, {"dog": 10, "cat": 20, "bird": 10})
    (root / "notes.txt").write_text("not an image folder")
    prepared = builders.prepare("folders", str(root), cache_dir)
    assert prepared.class_names == ["bird", "cat", "dog"]
    train_split = prepared.splits["train"]
    assert train_split.image_ids[0] == "bird/img00" and train_split.labels.tolist().count(1) == 20
    assert "validation" not in prepared.splits
    data = splits.make_run_data(prepared, data_config("folders", root, cache_dir, val_fraction=0.25))
    counts = np.bincount(data.validation.labels).tolist()
    assert sum(counts) == 10 and counts[1] == 5 and sorted(counts[::2]) == [2, 3]  # 25% of 10/20/10
    assert len(data.train) + len(data.validation) == 40
    assert not set(data.train.image_ids) & set(data.validation.image_ids)
    assert data.train.source is data.validation.source
    assert not set(data.train.records.tolist()) & set(data.validation.records.tolist())
    again = splits.make_run_data(prepared, data_config("folders", root, cache_dir, val_fraction=0.25))
    assert again.validation.image_ids == data.validation.image_ids  # seeded by data.split_seed
    other = splits.make_run_data(prepared, data_config("folders", root, cache_dir, val_fraction=0.25, split_seed=1))
    assert other.validation.image_ids != data.validation.image_ids


def test_class_folders_with_validation_tree(tmp_path, cache_dir):
    root = tmp_path / "tree"
    make_class_folders(root / "train", {"a": 4, "b": 3})
    make_class_folders(root / "validation", {"a": 2, "b": 2})
    prepared = builders.prepare("folders", str(root), cache_dir)
    assert prepared.class_names == ["a", "b"]
    assert prepared.splits["validation"].labels.tolist() == [0, 0, 1, 1]
    record = prepared.splits["train"].source[1]
    assert record["image"].shape == (8, 9, 3)  # stored at original size; resized in the pipeline
    make_class_folders(tmp_path / "mismatch" / "train", {"a": 1})
    make_class_folders(tmp_path / "mismatch" / "validation", {"c": 1})
    with pytest.raises(DataError, match="class folders differ"):
        builders.prepare("folders", str(tmp_path / "mismatch"), cache_dir)


def test_digits(cache_dir):
    prepared = builders.prepare("digits", "", cache_dir)
    assert prepared.class_names == [str(d) for d in range(10)]
    train = prepared.splits["train"]
    assert len(train.labels) == 1797
    record = train.source[0]
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    assert record["image"].max() > 200 and record["image"][0, 0, 0] == 0  # ink and background
    np.testing.assert_array_equal(record["image"][..., 0], record["image"][..., 2])
    data = splits.make_run_data(prepared, data_config("digits", "", cache_dir, val_fraction=0.2))
    assert (len(data.train), len(data.validation)) == (1437, 360)
    counts = np.bincount(data.validation.labels)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 20% of ~180 per class


def test_balanced_subsets(small_competition, cache_dir):
    prepared = builders.prepare("competition", str(small_competition), cache_dir)
    data = splits.make_run_data(prepared, data_config(
        "competition", small_competition, cache_dir, max_train_examples=12, max_val_examples=5))
    assert np.bincount(data.train.labels).tolist() == [3, 3, 2, 2, 2]  # round robin from class 0
    assert np.bincount(data.validation.labels).tolist() == [1, 1, 1, 1, 1]
    assert list(data.train.records) == sorted(data.train.records)  # CSV order kept
    with pytest.raises(ConfigError, match="'data.class_repeats' has 3 entries but the data has 5 classes"):
        splits.make_run_data(prepared, data_config(
            "competition", small_competition, cache_dir, class_repeats=(1, 2, 3)))


def test_folders_layout_edge_cases(tmp_path, cache_dir):
    root = tmp_path / "only_train"
    make_class_folders(root / "train", {"a": 6, "b": 6})
    prepared = builders.prepare("folders", str(root), cache_dir)  # train/ alone: classes under it
    assert prepared.class_names == ["a", "b"] and "validation" not in prepared.splits
    (root / "__MACOSX" / "junk").mkdir(parents=True)
    assert builders.prepare("folders", str(root), cache_dir).class_names == ["a", "b"]
    tiny = tmp_path / "tiny"
    make_class_folders(tiny, {"a": 2, "b": 2, "c": 2})
    prepared = builders.prepare("folders", str(tiny), cache_dir)
    with pytest.raises(DataError, match="cannot hold out data.val_fraction=0.1 of the 6 training images"):
        splits.make_run_data(prepared, data_config("folders", tiny, cache_dir))
    empty_val = tmp_path / "empty_val"
    make_class_folders(empty_val / "train", {"a": 2})
    (empty_val / "validation" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="the validation split under .* holds no images"):
        builders.prepare("folders", str(empty_val), cache_dir)


def test_csv_that_is_not_utf8_is_one_line(small_competition, tmp_path, cache_dir):
    import shutil
    root = tmp_path / "latin"
    shutil.copytree(small_competition, root)
    (root / "train.csv").write_bytes("image_id,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="train.csv' is not UTF-8 text"):
        builders.prepare("competition", str(root), cache_dir)
