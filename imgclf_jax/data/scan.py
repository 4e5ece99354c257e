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
  ``train/<class>/...`` with optionally ``validation/<class>/...`` (or
  ``val/``, ``valid/``) and a ``test/`` folder (flat: unlabeled; a class tree:
  labelled), see :func:`scan_folders`;
- digits: scikit-learn's bundled 8x8 digits (no files).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
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
    """A scanned dataset: class names and, per split name, its examples in file/CSV order.

    sources: split name -> where its rows were listed, relative to the data
    folder (e.g. ``"train.csv + train/"``, ``"val/"``), for the start banner.
    """

    class_names: list[str]
    splits: dict[str, list[Example]]
    sources: dict[str, str] = dataclasses.field(default_factory=dict)


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


def has_labels(path: str) -> bool:
    """Whether the CSV at `path` has a ``label`` column filled in on every row (False when none is).

    Raises:
      DataError: the column is filled in on some rows only (names the first empty line).
    """
    if "label" not in csv_header(path):
        return False
    rows = read_csv(path, need_label=True)
    empty = [line for line, _, text in rows if not text]
    if len(empty) == len(rows):
        return False
    if empty:
        raise DataError(f"CSV file '{path}' line {empty[0]}: empty label (other rows have labels; fill them "
                        "all in, or leave the column empty for an unlabeled split)")
    return True


def csv_header(path: str) -> list[str]:
    """The stripped header cells of the CSV at `path` ([] if it cannot be read: read_csv reports that)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError):
        return []  # read_csv reports it


def _parse_label(path: str, line: int, image_id: str, text: str, num_classes: int | None,
                 inferred: bool = False) -> int:
    """The integer label of CSV row `line` (image `image_id`), checked against 0..num_classes-1.

    `num_classes` None: only negative labels are refused; `inferred`: num_classes
    came from the training CSV's largest label (named as such in the error).

    Raises:
      DataError: a label that is not an integer or lies outside the classes, naming file, line and image.
    """
    # Plain ASCII digits only: int() would also take '1_0' (as 10), ' 3', '+3' or other scripts' digits.
    if not re.fullmatch(r"-?[0-9]+", text):
        raise DataError(f"CSV file '{path}' line {line}: label {text!r} is not an integer "
                        f"(image '{image_id}')")
    label = int(text)
    if label < 0:
        raise DataError(f"CSV file '{path}' line {line}: label {label} of image '{image_id}' is negative "
                        "(labels are class indices 0..K-1)")
    if num_classes is not None and label >= num_classes:
        why = ("inferred from train.csv's largest label; set data.num_classes to declare the classes"
               if inferred else f"data.num_classes={num_classes}")
        raise DataError(f"CSV file '{path}' line {line}: label {label} of image '{image_id}' is outside "
                        f"0..{num_classes - 1} ({why})")
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
    _check_competition_layout(root)
    splits: dict[str, list[Example]] = {}
    inferred = False
    for split, labelled in (("train", True), ("validation", True), ("test", False)):
        csv_path = os.path.join(root, f"{split}.csv")
        if split == "test" and not os.path.exists(csv_path):
            if os.path.isdir(os.path.join(root, "test")):
                print(f"warning: '{os.path.join(root, 'test')}' exists but there is no test.csv: no test "
                      "split (write test.csv with an image_id column to predict it into submission.csv)",
                      file=sys.stderr)
            continue
        if split == "test":
            labelled = has_labels(csv_path)  # a filled label column: a labelled test split, scored
        rows = read_csv(csv_path, need_label=labelled)
        if labelled:
            labels = [_parse_label(csv_path, line, image_id, text, num_classes or None, inferred)
                      for line, image_id, text in rows]
            if not num_classes:
                num_classes, inferred = max(labels) + 1, True
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
    sources = {split: f"{split}.csv + {split}/" for split in splits}
    return Scan(class_names=[str(i) for i in range(num_classes)], splits=splits, sources=sources)


def _subfolders(folder: str) -> list[str]:
    """Sorted names of the non-hidden subfolders of `folder` (``__MACOSX`` left out)."""
    return sorted(e.name for e in os.scandir(folder)
                  if e.is_dir() and not e.name.startswith((".", "__MACOSX")))


def _holds_images(folder: str, exts: frozenset[str]) -> bool:
    return any(e.is_file() and os.path.splitext(e.name)[1].lower() in exts and not e.name.startswith(".")
               for e in os.scandir(folder))


def _check_competition_layout(root: str) -> None:
    """Refuses a class-folder tree given to the competition builder (no train.csv, class subfolders).

    Raises:
      DataError: `root` has no train.csv but subfolders of images under it or under its train/.
    """
    if os.path.exists(os.path.join(root, "train.csv")):
        return
    exts = image_extensions()
    train = os.path.join(root, "train")
    if os.path.isdir(train) and _subfolders(train):
        base, names = train, _subfolders(train)
    else:  # the competition's own image folders are not classes
        base = root
        names = [n for n in _subfolders(root) if n.lower() not in ("train", "validation", "test")]
    classes = [name for name in names if _holds_images(os.path.join(base, name), exts)]
    if not classes:
        return  # a competition folder missing its CSV: read_csv names it
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    raise DataError(f"data folder '{root}' has no train.csv but class folders ({shown}) under "
                    f"'{base}': for one folder per class use --config.data.builder=folders")



# Folder names recognised as splits of a `folders` tree (compared case-insensitively).
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val", "valid"), "test": ("test",)}


def class_tree(folder: str, exts: frozenset[str]) -> tuple[list[str], list[Example]]:
    classes = _subfolders(folder)
    if not classes:
        raise DataError(f"folder '{folder}' has no class subfolders (expected {folder}/<class>/<image>)")
    examples = []
    for label, name in enumerate(classes):
        files = index_folder(os.path.join(folder, name), exts)
        for stem in sorted(files):
            examples.append(Example(f"{name}/{stem}", label, files[stem]))
    return classes, examples


def split_folders(root: str) -> dict[str, str]:
    """Split name -> folder name for the subfolders of `root` named as splits (see SPLIT_FOLDERS).

    Raises:
      DataError: two folders for one split (e.g. both val/ and validation/).
    """
    found: dict[str, list[str]] = {}
    for name in _subfolders(root):
        for split, names in SPLIT_FOLDERS.items():
            if name.lower() in names:
                found.setdefault(split, []).append(name)
    for split, names in found.items():
        if len(names) > 1:
            raise DataError(f"data folder '{root}' has two {split} folders, "
                            f"{' and '.join(repr(n + '/') for n in names)}: keep one (rename or move the other)")
    return {split: names[0] for split, names in found.items()}


def scan_folders(root: str, num_classes: int = 0) -> Scan:
    """Scans a one-folder-per-class layout.

    - ``root/<class>/*``: one 'train' split (the validation split is then held
      out of it, see :mod:`imgclf_jax.data.splits`);
    - ``root/train/<class>/*``, optionally with a validation tree
      ``root/{validation,val,valid}/<class>/*`` and a ``root/test/`` folder
      (split folder names are matched case-insensitively):
      * a flat ``test/`` (images, no subfolders) is an unlabeled test split
        (predicted into submission.csv);
      * a ``test/<class>/*`` tree is labelled: without a validation tree it is
        the validation split; with one, it is a labelled test split
        (predicted into submission.csv, labels kept).
      Class folders of every tree must have the same names as train's. Other
      folders beside the split folders are ignored with a warning.

    Hidden folders and ``__MACOSX`` are ignored. Class order is the sorted
    folder names; ids are ``<class>/<stem>`` (flat test: ``<stem>``).

    Args:
      root: the data folder (data.dir).
      num_classes: data.num_classes; if non-zero, the number of class folders must equal it.

    Raises:
      DataError: missing folder, no classes, two folders for one split, a split
        folder without train/, mismatched class folders, an empty class, a test
        folder with both images and subfolders, a class count other than num_classes.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' not found: point data.dir at your class folders "
                        "(--config.data.dir=PATH)")
    exts = image_extensions()
    named = split_folders(root)
    splits: dict[str, list[Example]] = {}
    sources: dict[str, str] = {}
    if "train" not in named:
        if named:
            folder = next(iter(named.values()))
            raise DataError(f"data folder '{root}' has a '{folder}/' folder but no train/: put the training "
                            f"images under train/<class>/ (or rename the class folder '{folder}')")
        classes, splits["train"] = class_tree(root, exts)
        sources["train"] = "the class folders"
        train_dir = root
    else:
        train_dir = os.path.join(root, named["train"])
        classes, splits["train"] = class_tree(train_dir, exts)
        sources["train"] = f"{named['train']}/"
        others = [n for n in _subfolders(root) if n not in named.values()]
        if others:
            print(f"warning: ignored folder(s) under '{root}': {', '.join(n + '/' for n in others)} "
                  "(read are train/, validation/ (or val/, valid/) and test/)", file=sys.stderr)

        def tree(name: str) -> list[Example]:
            folder = os.path.join(root, name)
            tree_classes, examples = class_tree(folder, exts)
            if tree_classes != classes:
                raise DataError(f"class folders differ: '{train_dir}' has {classes}, '{folder}' has {tree_classes}")
            return examples

        if "validation" in named:
            splits["validation"] = tree(named["validation"])
            sources["validation"] = f"{named['validation']}/"
        if "test" in named:
            name = named["test"]
            test_dir = os.path.join(root, name)
            has_images, has_folders = _holds_images(test_dir, exts), bool(_subfolders(test_dir))
            if has_images and has_folders:
                raise DataError(f"test folder '{test_dir}' holds both images and subfolders: make it flat "
                                "(unlabeled images to predict) or one subfolder per class (labelled)")
            if has_folders and "validation" not in named:
                splits["validation"] = tree(name)
                sources["validation"] = f"{name}/ (a class tree; used as validation: there is no validation folder)"
            elif has_folders:
                splits["test"] = tree(name)
                sources["test"] = f"{name}/ (a class tree: labelled)"
            else:
                files = index_folder(test_dir, exts)
                if not files:
                    raise DataError(f"test folder '{test_dir}' holds no images (remove it, or add images)")
                splits["test"] = [Example(stem, -1, files[stem]) for stem in sorted(files)]
                sources["test"] = f"{name}/ (unlabeled)"
    for split, examples in splits.items():
        if not examples:
            raise DataError(f"the {split} split under '{root}' holds no images")
    for label, name in enumerate(classes):
        if not any(e.label == label for e in splits["train"]):
            raise DataError(f"class folder '{name}' under '{train_dir}' has no images")
    if num_classes and num_classes != len(classes):
        raise DataError(f"data.num_classes={num_classes} but '{train_dir}' has {len(classes)} class folders "
                        f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}): set "
                        f"--config.data.num_classes={len(classes)}, or 0 to take the folders as they are")
    return Scan(class_names=classes, splits=splits, sources=sources)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``uint8[1797, 8, 8]`` (0..16 scaled to 0..255) and ``int64[1797]`` labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)
