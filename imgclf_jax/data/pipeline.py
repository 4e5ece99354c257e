"""grain input pipelines: resampling, a fresh shuffle per epoch, decoding, augmentation, padded batches.

Training (one grain chain, indexed by the global row position ``i``)::

    MapDataset.range(num_epochs * steps_per_epoch * B)   # epoch e = i // (S*B), slot p = i % (S*B)
      .map(locate)       # slot p < N: resampled[shuffle_e(p)]; else a padding slot
      .map(load)         # decode the record, resize to data.image_size (PIL, data.resize_method)
      .random_map(aug)   # the augment.ops in order (default: Keras's warp, then flip), seeded by (seed, i)
      .map(finish)       # scale to [0, 1] (then per-channel normalization if on), label, mask
      .batch(B)          # global batch j = e * S + step

where ``resampled`` repeats each training row by its class's factor
(``data.class_repeats``), N = len(resampled), S = steps_per_epoch = ceil(N / B),
and ``shuffle_e`` is grain's index shuffle with a per-epoch seed. So every
epoch is a permutation of the resampled rows, the last batch of an epoch is
padded (mask False) rather than mixed with the next epoch, and batch j is a
pure function of (seed, j): the same seed gives the same batches whatever the
number of worker processes or threads, and a run can resume at any batch.

Images keep their stored size when ``data.image_size`` equals it (no resampling:
the pixels are the file's, e.g. the competition's 100x100 images at
``data.image_size=100``); other sizes are resized with ``data.resize_method``.

A batch is a dict of numpy arrays::

    image: float32[B, H, W, 3] in [0, 1] (x / 255 of the 8-bit pixels x), or, with per-channel
           normalization on (data.channel_mean, data.channel_std), (x / 255 - mean) / std per
           channel (about zero mean and unit variance, no fixed range); padding rows are
           the zero image (x = 0) through the same formula
    label: int32[B]            (0 where padded or unlabeled)
    mask:  bool[B]             (True for real rows)
    row:   int32[B]            (position in the split, -1 where padded)

With ``data.augment_on='device'`` (:mod:`imgclf_jax.data.placement` resolves ``auto``), the chain
keeps ``locate``, ``load`` and the per-(seed, i) generator, but the generator only *draws* each
image's parameters (``aug float32[P]``, :meth:`AugmentParams.draw`: the same numbers the host
ops would draw) and the batch carries ``image uint8[B, H, W, 3]`` (the resized pixels), ``aug``,
label, mask and row; :class:`imgclf_jax.data.device_augment.DeviceStage` then warps, scales and
normalizes on the accelerator, giving the batch above to float tolerance. With
``data.on_device=true`` the chain skips ``load`` too (the split's pixels are in device memory,
gathered there by ``row``). Validation, test and ``predict`` batches always take the host path.

Training, validation, test and ``predict`` batches all go through the same
``finish`` step, so the normalization is the same everywhere (predict reads the
keys from the run's config.json; a run saved before they existed has them off).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from typing import Iterator

import grain
import ml_collections
import numpy as np

from imgclf_jax.data import placement
from imgclf_jax.data.augment import AugmentParams, random_augment
from imgclf_jax.data.imageio import resize
from imgclf_jax.data.splits import Split

PAD = -1


def resampled_positions(labels: np.ndarray, class_repeats: tuple[int, ...]) -> np.ndarray:
    """Each position repeated by its class's factor (() = once each), in order.

    Args:
      labels: int64[N] class labels.
      class_repeats: factor per class, e.g. (2, 2, 2, 2, 3).
    Returns:
      int64[sum of factors] positions into the split.
    """
    positions = np.arange(len(labels), dtype=np.int64)
    if not class_repeats:
        return positions
    factors = np.asarray(class_repeats, dtype=np.int64)[labels]
    return np.repeat(positions, factors)


def steps_per_epoch(labels: np.ndarray, class_repeats: tuple[int, ...], batch_size: int) -> int:
    """Updates per epoch of a training split: ceil(resampled rows / batch_size) (the last batch padded).

    Args:
      labels: int64[N] the training split's labels; class_repeats: ``data.class_repeats``;
      batch_size: ``train.batch_size`` (the global batch).
    """
    return math.ceil(len(resampled_positions(labels, class_repeats)) / batch_size)


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (shuffle, augmentation) from the run seed."""
    shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(augment_seed)


@dataclasses.dataclass(frozen=True)
class _Locate:
    """Global row position -> (epoch, position in the split or PAD)."""

    resampled: np.ndarray
    shuffled: grain.MapDataset
    slots_per_epoch: int

    def __call__(self, index: int) -> dict:
        epoch, slot = divmod(int(index), self.slots_per_epoch)
        n = len(self.resampled)
        if slot >= n:
            return {"row": PAD}
        return {"row": int(self.resampled[self.shuffled[epoch * n + slot]])}


@dataclasses.dataclass(frozen=True)
class _InOrder:
    """Position i -> row i, or PAD past the end."""

    size: int

    def __call__(self, index: int) -> dict:
        return {"row": int(index) if index < self.size else PAD}


@dataclasses.dataclass(frozen=True)
class _Load:
    """Reads a row's record, resized to ``image_size`` (uint8), or zeros for padding; with ``pixels=False``
    (``data.on_device``: the device holds them) the row's label only."""

    split: Split
    image_size: int
    resize_method: str
    pixels: bool = True

    def __call__(self, element: dict) -> dict:
        row = element["row"]
        label = 0 if row == PAD else max(int(self.split.labels[row]), 0)
        if not self.pixels:
            return {"label": label, "row": row}
        if row == PAD:
            image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        else:
            record = self.split.source[int(self.split.records[row])]
            image = resize(record["image"], self.image_size, self.resize_method)
        return {"image": image, "label": label, "row": row}


@dataclasses.dataclass(frozen=True)
class _Augment:
    """Applies the recipe's ops (:func:`imgclf_jax.data.augment.random_augment`) to real rows, not padding."""

    params: AugmentParams

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        if element["row"] != PAD:
            element = dict(element, image=random_augment(element["image"], rng, self.params))
        return element


@dataclasses.dataclass(frozen=True)
class _Draw:
    """``data.augment_on='device'``: draws a real row's parameters (``aug float32[P]``) from the generator
    the host path would augment it with; padding rows get zeros (their zero image stays zero)."""

    params: AugmentParams
    image_size: int

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        if element["row"] == PAD:
            return dict(element, aug=np.zeros(self.params.num_params, np.float32))
        return dict(element, aug=self.params.draw(rng, self.image_size, self.image_size))


@dataclasses.dataclass(frozen=True)
class _Handover:
    """``data.augment_on='device'``: the batch element for :class:`imgclf_jax.data.device_augment.DeviceStage`:
    ``image uint8[H, W, 3]`` (absent with data.on_device), ``aug float32[P]``, label, mask, row."""

    num_params: int

    def __call__(self, element: dict) -> dict:
        out = {
            "aug": element.get("aug", np.zeros(self.num_params, np.float32)),
            "label": np.int32(element["label"]),
            "mask": np.bool_(element["row"] != PAD),
            "row": np.int32(element["row"]),
        }
        if "image" in element:
            out["image"] = np.asarray(element["image"], np.uint8)
        return out


def normalization(data_config) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean float32[3], std float32[3]) of ``data.channel_mean`` / ``data.channel_std``, None when off.

    Units: the [0, 1] pixel scale (x / 255). A key absent (the config.json of a run saved before
    these keys existed) or ``()`` means off.
    """
    mean, std = tuple(data_config.get("channel_mean", ())), tuple(data_config.get("channel_std", ()))
    if not mean and not std:
        return None
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


@dataclasses.dataclass(frozen=True)
class _Finish:
    """uint8/float pixels 0..255 -> the batch element: x / 255, then ``(. - mean) / std`` if on."""

    mean: np.ndarray | None = None  # float32[3], or None: off
    std: np.ndarray | None = None

    def __call__(self, element: dict) -> dict:
        image = np.asarray(element["image"], np.float32) * np.float32(1.0 / 255.0)
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return {
            "image": image,
            "label": np.int32(element["label"]),
            "mask": np.bool_(element["row"] != PAD),
            "row": np.int32(element["row"]),
        }


def _finisher(config: ml_collections.ConfigDict) -> _Finish:
    norm = normalization(config.data)
    return _Finish() if norm is None else _Finish(*norm)


@dataclasses.dataclass
class TrainPipeline:
    """The training batches of a run; ``dataset[j]`` is global batch j (epoch j // steps_per_epoch)."""

    dataset: grain.MapDataset
    rows: grain.MapDataset  # global row position -> {'row': position in the split or PAD}
    steps_per_epoch: int
    batch_size: int
    epoch_size: int  # rows per epoch after resampling (real rows, no padding)
    num_workers: int
    # 'host': batches as the train step takes them; 'device': uint8 pixels (or, with on_device, none) and
    # each row's drawn parameters, for imgclf_jax.data.device_augment.DeviceStage
    augment_on: str = "host"
    on_device: bool = False

    def batches(self, start_step: int = 0, stop_step: int | None = None) -> Iterator[dict]:
        """Iterates batches [start_step, stop_step) (global ones; a process's share with `shard`) with grain
        threads / worker processes."""
        return iterate(self.dataset[start_step:stop_step], self.num_workers)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """int64[N]: the split positions of one epoch's real rows, in batch order (no images read)."""
        per_epoch = self.steps_per_epoch * self.batch_size  # padded slots per epoch
        rows = [self.rows[i]["row"] for i in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        return np.array([r for r in rows if r != PAD], dtype=np.int64)

    def epoch(self, epoch: int) -> Iterator[dict]:
        """The batches of one epoch (0-based)."""
        s = self.steps_per_epoch
        return self.batches(epoch * s, (epoch + 1) * s)


def iterate(dataset: grain.MapDataset, num_workers: int) -> Iterator[dict]:
    """Iterates a batched MapDataset in order; num_workers > 0 uses grain worker processes.

    Call ``close()`` on the iterator when done early, to stop the workers at once.
    """
    threads = min(4, os.cpu_count() or 1)
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags in the workers; we parse none
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                            worker_init_fn=_ignore_interrupts)
        return _WorkerIterator(iter(it))
    return iter(it)


class _WorkerIterator:
    """Starts grain's worker processes with SIGINT blocked, so Ctrl-C reaches only the main process.

    The workers inherit the blocked signal (and then ignore it); the main process
    unblocks it once they are started, receives any Ctrl-C that arrived meanwhile,
    checkpoints, and closes them.
    """

    def __init__(self, iterator):
        self._iterator, self._started = iterator, False

    def __iter__(self):
        return self

    def __next__(self):
        if self._started:
            return next(self._iterator)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return next(self._iterator)
        finally:
            self._started = True
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def close(self) -> None:
        """Stops the worker processes."""
        self._iterator.close()


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """Grain workers leave Ctrl-C to the main process, which checkpoints and then closes them."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclasses.dataclass(frozen=True)
class _ShareRows:
    """Row k of one process's share -> its row of the global stream (see :func:`process_share`)."""

    rows: grain.MapDataset  # the global stream, one element per row (not batched)
    batch_size: int  # the global batch B
    index: int
    count: int

    def __call__(self, k: int) -> dict:
        local = self.batch_size // self.count
        step, r = divmod(int(k), local)
        return self.rows[step * self.batch_size + self.index * local + r]


def process_share(rows: grain.MapDataset, batch_size: int, shard: tuple[int, int]) -> grain.MapDataset:
    """Process `shard` = (index p, count P)'s batches of a per-row stream: batch j is rows
    ``j*B + p*B/P ... j*B + (p+1)*B/P - 1`` of the global stream (its p-th block of global batch j).

    Each row is computed exactly as in the global stream (grain seeds a row's augmentation by its global
    position), so the P shares of batch j, concatenated in process order, are the single-process batch j.
    With P = 1 it is ``rows.batch(B)`` itself.

    Raises:
      ValueError: B is not a multiple of P (the mesh refuses such a run first: :func:`imgclf_jax.parallel.make_mesh`).
    """
    index, count = shard
    if count == 1:
        return rows.batch(batch_size)
    if batch_size % count:
        raise ValueError(f"batch size {batch_size} is not a multiple of {count} processes")
    shared = grain.MapDataset.range(len(rows) // count).map(_ShareRows(rows, batch_size, index, count))
    return shared.batch(batch_size // count)


def train_pipeline(
    split: Split, config: ml_collections.ConfigDict, num_epochs: int | None = None, seed: int | None = None,
    shard: tuple[int, int] = (0, 1), augment_on: str | None = None, on_device: bool | None = None,
) -> TrainPipeline:
    """Builds the training pipeline from a run's config (sections data, augment, train; key seed).

    With ``data.augment_on`` resolved to 'device' (:func:`imgclf_jax.data.placement.resolve`) a batch
    is ``image uint8[B, H, W, 3]`` (absent with ``data.on_device``), ``aug float32[B, P]`` (each row's
    drawn augmentation parameters), ``label``, ``mask``, ``row``, for the run's
    :class:`imgclf_jax.data.device_augment.DeviceStage`, which turns it into the batch above on the devices.

    Args:
      split: the training rows.
      config: the run config.
      num_epochs: epochs to cover (default train.num_epochs).
      seed: the data order and augmentation seed (default config.seed).
      shard: (process index, process count) of a multi-process run: ``dataset[j]`` is then this
        process's block of global batch j (:func:`process_share`); ``batch_size`` stays the global B.
      augment_on, on_device: override ``data.augment_on`` (resolved: 'host' | 'device') and
        ``data.on_device`` (e.g. a preview that needs the pixels); None = the config's.
    """
    num_epochs = num_epochs or config.train.num_epochs
    batch_size = config.train.batch_size
    params = AugmentParams(**config.augment.to_dict())
    augment_on = placement.resolve(config.data, recipe=params) if augment_on is None else augment_on
    on_device = bool(config.data.get("on_device", False)) if on_device is None else on_device
    resampled = resampled_positions(split.labels, tuple(config.data.class_repeats))
    steps = steps_per_epoch(split.labels, tuple(config.data.class_repeats), batch_size)
    shuffle_seed, augment_seed = _seeds(config.seed if seed is None else seed)
    shuffled = grain.MapDataset.range(len(resampled)).shuffle(seed=shuffle_seed)
    rows = grain.MapDataset.range(num_epochs * steps * batch_size)
    rows = rows.map(_Locate(resampled, shuffled, steps * batch_size))
    ds = rows.map(_Load(split, config.data.image_size, config.data.resize_method, pixels=not on_device))
    if augment_on == "device":
        if params.active:  # the same generator per row as the host's _Augment: the same draws
            ds = ds.random_map(_Draw(params, config.data.image_size), seed=augment_seed)
        ds = ds.map(_Handover(params.num_params))
    else:
        if params.active:
            ds = ds.random_map(_Augment(params), seed=augment_seed)
        ds = ds.map(_finisher(config))
    ds = process_share(ds, batch_size, shard)
    return TrainPipeline(ds, rows, steps, batch_size, len(resampled), config.data.num_workers,
                         augment_on, on_device)


@dataclasses.dataclass(frozen=True)
class _StackMembers:
    """Global batch j -> every member's batch j stacked on a leading member axis.

    ``datasets`` are the distinct seeds' streams, each loaded once per batch; member i gets
    ``datasets[order[i]]``'s batch (a population's combinations share their seed's batch).
    """

    datasets: tuple
    order: tuple

    def __call__(self, index: int) -> dict:
        batches = [ds[int(index)] for ds in self.datasets]
        return {key: np.stack([batches[i][key] for i in self.order]) for key in batches[0]}


def ensemble_train_pipeline(split: Split, config: ml_collections.ConfigDict, seeds: list[int],
                            num_epochs: int | None = None, shard: tuple[int, int] = (0, 1),
                            augment_on: str | None = None, on_device: bool | None = None) -> TrainPipeline:
    """K members' training batches in one stream: batch j holds member i's batch j of seed ``seeds[i]``.

    Each member's batches are exactly those of ``train_pipeline(split, config, seed=seeds[i])``
    (its own order and augmentation), stacked: ``image float32[K, B, H, W, 3]``,
    ``label int32[K, B]``, ``mask bool[K, B]``, ``row int32[K, B]``. Every member has
    the same steps per epoch (same rows, same resampling), so padding lines up.
    ``rows`` and ``epoch_rows`` are member 0's. Members with the same seed (a population's
    combinations of one seed) get the same batch, decoded and augmented once and copied.
    `shard`: a process's share of each member's batch, as in :func:`train_pipeline` (``[K, B/P, ...]``).
    """
    distinct = list(dict.fromkeys(seeds))
    members = [train_pipeline(split, config, num_epochs, seed=s, shard=shard, augment_on=augment_on,
                              on_device=on_device) for s in distinct]
    stacked = grain.MapDataset.range(len(members[0].dataset)).map(
        _StackMembers(tuple(m.dataset for m in members), tuple(distinct.index(s) for s in seeds)))
    return dataclasses.replace(members[0], dataset=stacked)


def rows_dataset(split: Split, image_size: int, resize_method: str) -> grain.MapDataset:
    """Row i of `split` -> ``{'image': uint8[S, S, 3], 'label', 'row'}`` as training loads it (no augmentation)."""
    return grain.MapDataset.range(len(split)).map(_InOrder(len(split))).map(_Load(split, image_size, resize_method))


def eval_dataset(split: Split, config: ml_collections.ConfigDict, batch_size: int | None = None,
                 shard: tuple[int, int] = (0, 1)):
    """Batches of `split` in order, resized and normalized as in training, no augmentation, last batch padded.

    Returns a grain MapDataset of ceil(N / B) batches; with `shard` = (p, P), process p's block of
    each (B / P rows: :func:`process_share`).
    """
    batch_size = batch_size or config.train.batch_size
    steps = math.ceil(len(split) / batch_size)
    ds = grain.MapDataset.range(steps * batch_size).map(_InOrder(len(split)))
    ds = ds.map(_Load(split, config.data.image_size, config.data.resize_method))
    return process_share(ds.map(_finisher(config)), batch_size, shard)
