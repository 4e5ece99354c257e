"""Scanning a dataset's layout into explicit example lists, checking everything first.

A scan reads CSVs and folder listings (not image pixels) and returns, per split,
the ordered list of examples: image id, label (-1 where unlabeled) and file
path. Every problem is reported as one :class:`DataError` naming the file and,
for CSVs, the 1-based line number (the header is line 1).

Layouts:
- competition: ``train.csv`` / ``validation.csv`` (``image_id,label``), optional
  ``test.csv`` (``image_id``), image folders ``train/``, ``validation/``,
  ``test/`` with files ``<image_id>.<ext>`` (any extension Pillow reads);
- folders: ``<class>/<file>`` (classes = sorted folder names), or
  ``train/<class>/...`` plus ``validation/<class>/...`` and optionally a flat
  ``test/`` folder;
- digits: scikit-learn's bundled 8x8 digits (no files).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys

import numpy as np

from imgclf_jax.data.imageio import image_extensions
from imgclf_jax.errors import DataError

KAGGLE_HINT = (
    "get the competition data from Kaggle (`kaggle competitions download -c "
    "deepfake-classification-unibuc`, then unzip it there) or pass --config.data.dir=PATH; "
    "configs/digits.py needs no download"
)


@dataclasses.dataclass(frozen=True)
class Example:
    """One image to prepare: its id, integer label (-1 = unlabeled), file path and where it was listed."""

    image_id: str
    label: int
    path: str
    origin: str = ""  # e.g. "train.csv line 5", named in errors about this image


@dataclasses.dataclass
class Scan:
    """A scanned dataset: class names and, per split name, its examples in file/CSV order."""

    class_names: list[str]
    splits: dict[str, list[Example]]


def strip_image_ext(name: str, exts: frozenset[str]) -> str:
    """`name` without its extension if that is an image extension ('a.png' -> 'a'), else unchanged."""
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in exts else name


def index_folder(folder: str, exts: frozenset[str]) -> dict[str, str]:
    """Maps image id (file name without extension) -> path for the image files in `folder`."""
    if not os.path.isdir(folder):
        raise DataError(f"image folder '{folder}' not found")
    index: dict[str, str] = {}
    for entry in os.scandir(folder):
        stem, ext = os.path.splitext(entry.name)
        if entry.is_file() and ext.lower() in exts and not entry.name.startswith("."):
            if stem in index:
                raise DataError(
                    f"image folder '{folder}' holds two files for id '{stem}': "
                    f"'{os.path.basename(index[stem])}' and '{entry.name}'"
                )
            index[stem] = entry.path
    return index


def read_csv(path: str, need_label: bool) -> list[tuple[int, str, str | None]]:
    """Reads an ``image_id[,label]`` CSV as (line number, id, label text or None) rows.

    Byte-order marks and CRLF line ends are accepted; extra columns are ignored;
    ids given with an image extension ('a.png') are read as 'a'.

    Raises:
      DataError: missing file, empty file, missing columns, an empty id or a duplicate id.
    """
    if not os.path.isfile(path):
        raise DataError(f"CSV file '{path}' not found")
    try:
        return _read_csv(path, need_label)
    except UnicodeDecodeError as e:
        raise DataError(f"CSV file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_csv(path: str, need_label: bool) -> list[tuple[int, str, str | None]]:
    exts = image_extensions()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"CSV file '{path}' is empty (expected a header 'image_id,label')")
        header = [h.strip() for h in header]
        need = ["image_id", "label"] if need_label else ["image_id"]
        missing = [c for c in need if c not in header]
        if missing:
            raise DataError(
                f"CSV file '{path}' line 1: missing column(s) {', '.join(missing)} "
                f"(header is {','.join(header)!r}, expected {','.join(need)!r})"
            )
        id_col = header.index("image_id")
        label_col = header.index("label") if need_label else None
        rows, seen = [], {}
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(id_col, label_col or 0):
                raise DataError(f"CSV file '{path}' line {line}: too few columns: {','.join(row)!r}")
            image_id = strip_image_ext(row[id_col].strip(), exts)
            if not image_id:
                raise DataError(f"CSV file '{path}' line {line}: empty image_id")
            if image_id in seen:
                raise DataError(
                    f"CSV file '{path}' line {line}: duplicate image_id '{image_id}' "
                    f"(first on line {seen[image_id]})"
                )
            seen[image_id] = line
            rows.append((line, image_id, row[label_col].strip() if need_label else None))
    if not rows:
        raise DataError(f"CSV file '{path}' has a header but no rows")
    return rows


def _parse_label(path: str, line: int, text: str, num_classes: int | None) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"CSV file '{path}' line {line}: label {text!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        allowed = f"0..{num_classes - 1}" if num_classes else ">= 0"
        raise DataError(f"CSV file '{path}' line {line}: label {label} is out of range ({allowed}; "
                        "the classes are 0..K-1, K = data.num_classes or the largest training label + 1)")
    return label


def scan_competition(root: str, num_classes: int = 0) -> Scan:
    """Scans the Kaggle competition layout under `root` (see the module docstring).

    The number of classes is `num_classes` (config key data.num_classes) or,
    when 0, the largest training label + 1; labels must lie in 0..K-1. A
    warning names classes without training rows. Ids given with an image
    extension are accepted.

    Raises:
      DataError: missing folder or file, malformed CSV, bad label, missing image.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' not found: {KAGGLE_HINT}")
    exts = image_extensions()
    splits: dict[str, list[Example]] = {}
    for split, labelled in (("train", True), ("validation", True), ("test", False)):
        csv_path = os.path.join(root, f"{split}.csv")
        if split == "test" and not os.path.exists(csv_path):
            continue
        rows = read_csv(csv_path, need_label=labelled)
        if labelled:
            labels = [_parse_label(csv_path, line, text, num_classes or None) for line, _, text in rows]
            if not num_classes:
                num_classes = max(labels) + 1
        else:
            labels = [-1] * len(rows)
        folder = os.path.join(root, split)
        files = index_folder(folder, exts)
        examples = []
        for (line, image_id, _), label in zip(rows, labels):
            path = files.get(image_id)
            if path is None:
                raise DataError(
                    f"CSV file '{csv_path}' line {line}: no image file for id '{image_id}' "
                    f"in '{folder}' (looked for {image_id}.<png|jpg|webp|...>)"
                )
            examples.append(Example(image_id, label, path, f"{os.path.basename(csv_path)} line {line}"))
        splits[split] = examples
    present = {ex.label for ex in splits["train"]}
    missing = [c for c in range(num_classes) if c not in present]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        print(f"warning: {len(missing)} of {num_classes} classes have no training rows in "
              f"'{os.path.join(root, 'train.csv')}': {shown}", file=sys.stderr)
    return Scan(class_names=[str(i) for i in range(num_classes)], splits=splits)


def _class_tree(folder: str, exts: frozenset[str]) -> tuple[list[str], list[Example]]:
    classes = sorted(e.name for e in os.scandir(folder)
                     if e.is_dir() and not e.name.startswith((".", "__MACOSX")))
    if not classes:
        raise DataError(f"folder '{folder}' has no class subfolders (expected {folder}/<class>/<image>)")
    examples = []
    for label, name in enumerate(classes):
        files = index_folder(os.path.join(folder, name), exts)
        for stem in sorted(files):
            examples.append(Example(f"{name}/{stem}", label, files[stem]))
    return classes, examples


def scan_folders(root: str) -> Scan:
    """Scans a one-folder-per-class layout.

    ``root/<class>/*`` or ``root/train/<class>/*`` alone gives one 'train'
    split (the validation split is then drawn from it, see
    :mod:`imgclf_jax.data.splits`); ``root/train/<class>/*`` with
    ``root/validation/<class>/*`` gives both, with the same class names
    required, and a flat ``root/test/`` folder, if present, an unlabeled test
    split. Hidden folders and ``__MACOSX`` are ignored. Class order is the sorted folder names; ids are ``<class>/<stem>``
    (test: ``<stem>``).

    Raises:
      DataError: missing folder, no classes, mismatched class folders, an empty class.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' not found")
    exts = image_extensions()
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "validation")
    splits = {}
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        classes, splits["train"] = _class_tree(train_dir, exts)
        val_classes, splits["validation"] = _class_tree(val_dir, exts)
        if val_classes != classes:
            raise DataError(
                f"class folders differ: '{train_dir}' has {classes}, '{val_dir}' has {val_classes}"
            )
        test_dir = os.path.join(root, "test")
        if os.path.isdir(test_dir):
            files = index_folder(test_dir, exts)
            if not files:
                raise DataError(f"test folder '{test_dir}' holds no images (remove it, or add images)")
            splits["test"] = [Example(stem, -1, files[stem]) for stem in sorted(files)]
    elif os.path.isdir(train_dir):
        classes, splits["train"] = _class_tree(train_dir, exts)
    else:
        classes, splits["train"] = _class_tree(root, exts)
    for split, examples in splits.items():
        if not examples:
            raise DataError(f"the {split} split under '{root}' holds no images")
    for label, name in enumerate(classes):
        if not any(e.label == label for e in splits["train"]):
            raise DataError(f"class folder '{name}' under '{root}' has no images")
    return Scan(class_names=classes, splits=splits)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``uint8[1797, 8, 8]`` (0..16 scaled to 0..255) and ``int64[1797]`` labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)
