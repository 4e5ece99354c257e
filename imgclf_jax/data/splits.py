"""The explicit row lists a run trains, validates and predicts on.

Each split of a run is an explicit, sorted list of record indices into one
prepared source; the training list and the validation list never share a
record (when the data has no validation split, both are drawn from the same
source by a stratified split on disjoint indices). Subsets
(``data.max_train_examples``, ``data.max_val_examples``) are class-balanced and
taken before resampling. Everything here is seeded by ``data.split_seed``, not
by ``seed``, so runs with different seeds see the same rows.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from imgclf_jax.data.builders import PreparedDataset, prepare
from imgclf_jax.errors import ConfigError, DataError


@dataclasses.dataclass
class Split:
    """Rows of one split: ``source[records[i]]`` is row i, with ``labels[i]`` and ``image_ids[i]``.

    records: int64[N] indices into `source`, increasing (file / CSV order kept).
    labels: int64[N], -1 where unlabeled.
    """

    source: object
    records: np.ndarray
    labels: np.ndarray
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, positions: np.ndarray) -> "Split":
        """The rows at `positions` (int[M], sorted first so the split's order is kept)."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        return Split(
            source=self.source,
            records=self.records[positions],
            labels=self.labels[positions],
            image_ids=[self.image_ids[p] for p in positions],
        )


@dataclasses.dataclass
class RunData:
    """The data of a run: class names and the train, validation and (optional) test splits."""

    class_names: list[str]
    train: Split
    validation: Split
    test: Split | None
    fingerprint: str = ""  # the prepared dataset's folder name (builder and cache key)
    content_digest: str = ""  # builders.content_digest of the prepared dataset ('' if prepared before digests)
    # split name -> where its rows came from, for the start banner, e.g.
    # {"train": "12,500 images from train.csv + train/", "validation": "1,250 images from validation.csv +
    # validation/"}, or held out: {"train": "3,600 images from train/ (the rest held out for validation)",
    # "validation": "400 images from train/ (10% held out by data.val_fraction=0.1,
    # stratified by class, data.split_seed=0)"}
    sources: dict = dataclasses.field(default_factory=dict)

    @property
    def identity(self) -> str:
        """What a resumed run must see again: the content digest, else the prepared folder's name."""
        return self.content_digest or self.fingerprint

    @property
    def num_classes(self) -> int:
        """Number of classes K (labels are 0..K-1)."""
        return len(self.class_names)


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Positions of a class-balanced subset of `size` rows (round-robin over classes).

    Each class contributes in turn a randomly chosen row (seeded) until `size`
    rows are taken, so class counts differ by at most one unless a class runs
    out. Returns sorted int64 positions; all positions if size >= len(labels).
    """
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    taken: list[int] = []
    depth = 0
    while len(taken) < size:
        for rows in per_class:
            if depth < len(rows) and len(taken) < size:
                taken.append(int(rows[depth]))
        depth += 1
    return np.sort(np.array(taken, dtype=np.int64))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (train, validation) positions, stratified by label (scikit-learn)."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    train, val = train_test_split(
        positions, test_size=val_fraction, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(val)


def _whole(prepared: PreparedDataset, name: str) -> Split:
    split = prepared.splits[name]
    return Split(
        source=split.source,
        records=np.arange(len(split.labels), dtype=np.int64),
        labels=split.labels,
        image_ids=list(split.image_ids),
    )


def _described(where: str, count: int, notes: list[str]) -> str:
    """'12,500 images from train.csv + train/' plus notes in parentheses, for RunData.sources."""
    return f"{count:,} image{'' if count == 1 else 's'} from {where}" + (f" ({'; '.join(notes)})" if notes else "")


def _default_val_fraction() -> float:
    """The schema's default ``data.val_fraction`` (a config that leaves it alone never sets it)."""
    from imgclf_jax.config import base_config

    return base_config().data.val_fraction


def make_run_data(prepared: PreparedDataset, data: ml_collections.ConfigDict) -> RunData:
    """Builds the run's splits from a prepared dataset and the ``data`` config section.

    Also fills :attr:`RunData.sources` (split name -> where its rows came from, with counts).

    Raises:
      ConfigError: data.class_repeats has a length other than the number of classes, or
        data.val_fraction is set (not the schema's default) while the data has its own validation split.
      DataError: fewer than 2 classes; too few training rows per class to hold out data.val_fraction.
    """
    if len(prepared.class_names) < 2:
        raise DataError(f"the data in '{data.dir}' has {len(prepared.class_names)} class "
                        f"({', '.join(prepared.class_names) or 'none'}): a classifier needs at least 2 "
                        "(add a class folder or rows of another label)")
    where = {split: prepared.sources.get(split, split) for split in prepared.splits}
    notes: dict[str, list[str]] = {"train": [], "validation": []}
    train = _whole(prepared, "train")
    if "validation" in prepared.splits:
        default = _default_val_fraction()
        if data.val_fraction != default:  # a setting the data makes meaningless: refused, not ignored
            raise ConfigError(
                f"config key 'data.val_fraction' ({data.val_fraction:g}) is not used: the data has its own "
                f"validation split ({prepared.sources.get('validation', 'validation')}); remove the override "
                f"(or set it back to {default:g})")
        validation = _whole(prepared, "validation")
    else:
        try:
            train_pos, val_pos = stratified_split(train.labels, data.val_fraction, data.split_seed)
        except ValueError as e:  # scikit-learn: too few rows per class for this fraction
            raise DataError(f"cannot hold out data.val_fraction={data.val_fraction} of the "
                            f"{len(train)} training images stratified by class: {e}") from None
        train, validation = train.subset(train_pos), train.subset(val_pos)
        where["validation"] = where["train"]
        notes["train"].append("the rest held out for validation")
        notes["validation"].append(f"{data.val_fraction * 100:g}% held out by data.val_fraction="
                                   f"{data.val_fraction:g}, stratified by class, data.split_seed={data.split_seed}")
    if data.max_train_examples:
        train = train.subset(balanced_subset(train.labels, data.max_train_examples, data.split_seed))
        notes["train"].append(f"a class-balanced subset, data.max_train_examples={data.max_train_examples}")
    if data.max_val_examples:
        validation = validation.subset(
            balanced_subset(validation.labels, data.max_val_examples, data.split_seed)
        )
        notes["validation"].append(f"a class-balanced subset, data.max_val_examples={data.max_val_examples}")
    test = _whole(prepared, "test") if "test" in prepared.splits else None
    num_classes = len(prepared.class_names)
    if data.class_repeats and len(data.class_repeats) != num_classes:
        raise ConfigError(
            f"config key 'data.class_repeats' has {len(data.class_repeats)} "
            f"entr{'y' if len(data.class_repeats) == 1 else 'ies'} but the data "
            f"has {num_classes} classes"
        )
    sources = {"train": _described(where["train"], len(train), notes["train"]),
               "validation": _described(where["validation"], len(validation), notes["validation"])}
    if test is not None:
        sources["test"] = _described(where["test"], len(test), [])
    return RunData(class_names=prepared.class_names, train=train, validation=validation, test=test,
                   fingerprint=os.path.basename(prepared.path), content_digest=prepared.content_digest,
                   sources=sources)


def load_run_data(data: ml_collections.ConfigDict) -> RunData:
    """Prepares (once) and opens the dataset named by the ``data`` config section."""
    prepared = prepare(data.builder, data.dir, data.cache_dir, data.num_classes)
    return make_run_data(prepared, data)
