"""tensorflow-datasets builders, prepared once into array_record files and read back without TensorFlow.

Each builder stores, per example, the decoded 8-bit RGB pixels at their
original size (``uint8[H, W, 3]``, zlib-compressed, lossless), the image id and
the integer label (-1 for unlabeled test rows). Shuffling is disabled, so
record i of a split is row i of its CSV (or listing): order is kept.

Preparation goes to ``<cache_dir>/<builder>-<key>/``, where the key hashes the
builder version, the absolute data path and the scanned file list (ids,
labels, file names, sizes, modification times): changed data is prepared
again, unchanged data never. It is written into a temporary folder and renamed
into place, so an interrupted or concurrent preparation never leaves a
half-written folder that a later run would trust. The data folder itself is
only read. A run records the prepared data's content digest (:func:`content_digest`:
ids, labels and decoded pixels), not the folder name, so the same images copied
anew (new modification times, so prepared again) still resume it.

The prepared folder carries a checksum manifest (:mod:`imgclf_jax.manifest`,
written before the rename), checked each time it is opened: a truncated
array_record file or garbage bytes in one stop before training with one line
naming the folder to delete. Folders prepared before manifests existed open
unverified (their record counts are still checked). A full disk during
preparation removes the temporary folder and says how much space is needed.

:data:`BUILDERS` is the ``data.builder`` table (config validation checks the name
and each entry's ignored data keys against it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from imgclf_jax import disk, manifest, progress
from imgclf_jax.data import packed, scan as scan_lib
from imgclf_jax.data.imageio import load_rgb
from imgclf_jax.errors import ConfigError, DataError, UserError
from imgclf_jax.registry import Registry

_CHUNK = 256  # images decoded at once by the preparation thread pool


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
            "image_id": tfds.features.Text(),
            "label": tfds.features.Scalar(dtype=np.int64),
        }
    )


class _ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: writes a :class:`imgclf_jax.data.scan.Scan` as array_record splits.

    Constructed with ``scan=None`` it can only read an already prepared folder.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, scan: scan_lib.Scan | None = None, **kwargs):
        self._scan = scan
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=_features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        self.info.metadata["class_names"] = list(self._scan.class_names)
        self.info.metadata["image_sizes"] = {}  # "HxW" -> count, filled while generating
        self.info.metadata["content_digests"] = {}  # split -> sha256 of its rows, filled while generating
        return {
            split: self._generate_examples(split, examples)
            for split, examples in self._scan.splits.items()
        }

    def _load(self, example: scan_lib.Example) -> np.ndarray:
        return load_rgb(example.path)

    def _load_checked(self, example: scan_lib.Example) -> np.ndarray:
        try:
            return self._load(example)
        except DataError as e:
            raise DataError(f"{e} ({example.origin})" if example.origin else str(e)) from None

    # tfds prints "Downloading and preparing ..." with the temporary folder's name;
    # prepare() reports the preparation itself.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _generate_examples(self, split: str, examples: list[scan_lib.Example]):
        workers = min(8, os.cpu_count() or 1)
        digest = hashlib.sha256()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool, progress.Bar(
            len(examples), f"preparing {split}"
        ) as bar:  # a tqdm bar on a terminal, plain lines in a log file
            for start in range(0, len(examples), _CHUNK):
                chunk = examples[start : start + _CHUNK]
                for offset, pixels in enumerate(pool.map(self._load_checked, chunk)):
                    example = chunk[offset]
                    size = f"{pixels.shape[0]}x{pixels.shape[1]}"
                    sizes = self.info.metadata["image_sizes"]
                    sizes[size] = sizes.get(size, 0) + 1
                    digest.update(f"{example.image_id}\0{example.label}\0{size}\0".encode())
                    digest.update(np.ascontiguousarray(pixels).tobytes())
                    yield start + offset, {
                        "image": pixels,
                        "image_id": example.image_id,
                        "label": example.label,
                    }
                bar.update(len(chunk))
        self.info.metadata["content_digests"][split] = digest.hexdigest()


class Competition(_ImageBuilder):
    """Kaggle competition layout: CSVs of image_id,label plus one image folder per split."""


class ClassFolders(_ImageBuilder):
    """One folder per class, optionally under train/ and validation/ (or val/, valid/) plus test/."""


class Digits(_ImageBuilder):
    """scikit-learn's bundled 8x8 handwritten digits as 32x32 RGB (bilinear upscaling)."""

    SIZE = 32

    def _load(self, example: scan_lib.Example) -> np.ndarray:
        from PIL import Image

        index = int(example.image_id)
        small = Image.fromarray(self._images[index])
        big = np.asarray(small.resize((self.SIZE, self.SIZE), Image.Resampling.BILINEAR))
        return np.repeat(big[..., None], 3, axis=-1)

    def _split_generators(self, dl_manager):
        self._images, _ = scan_lib.digits_arrays()
        return super()._split_generators(dl_manager)


def scan_digits() -> scan_lib.Scan:
    """All 1,797 digits as one 'train' split; ids are their indices ('0'..'1796')."""
    _, labels = scan_lib.digits_arrays()
    examples = [scan_lib.Example(str(i), int(y), "") for i, y in enumerate(labels)]
    return scan_lib.Scan(class_names=[str(d) for d in range(10)], splits={"train": examples},
                         sources={"train": "scikit-learn's bundled 8x8 digits"})


@dataclasses.dataclass(frozen=True)
class BuilderEntry:
    """One ``data.builder`` choice.

    Attributes:
      builder_cls: the tfds builder class that writes and reads the prepared copy.
      scan: ``scan(root, num_classes) -> Scan``: lists the examples (root = data.dir, '' when ignored).
      ignored_keys: the data keys this builder does not read, each ``key -> (accepted, why)``:
        the only value (or tuple of values) config validation accepts for it, and why it is unused.
        Every other data key is read (data.num_classes: competition labels must lie in
        0..num_classes-1; folders must have num_classes class folders; 0 = infer, for both).
        A builder that reads ``dir`` needs it set.
    """

    builder_cls: type
    scan: Callable[[str, int], scan_lib.Scan]
    ignored_keys: Mapping[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)


BUILDERS = Registry("data.builder")
BUILDERS.register("competition", BuilderEntry(Competition, scan_lib.scan_competition))
BUILDERS.register("folders", BuilderEntry(ClassFolders, scan_lib.scan_folders))
BUILDERS.register("digits", BuilderEntry(Digits, lambda root, num_classes: scan_digits(), ignored_keys={
    "dir": ("", "the digits are bundled with scikit-learn"),
    "num_classes": ((0, 10), "the digits have 10 classes"),
}))


@dataclasses.dataclass
class PreparedSplit:
    """One prepared split: a random-access source and its rows' ids and labels.

    ``source[i]`` is ``{'image': uint8[H, W, 3], 'image_id': bytes, 'label': int64}``.
    """

    source: object
    image_ids: list[str]
    labels: np.ndarray  # int64[N], -1 where unlabeled


@dataclasses.dataclass
class PreparedDataset:
    """A prepared dataset: where it lives, its class names, its splits and where each split was listed.

    sources: split name -> where its rows were listed (:attr:`imgclf_jax.data.scan.Scan.sources`).
    """

    path: str
    class_names: list[str]
    splits: dict[str, PreparedSplit]
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    content_digest: str = ""  # :func:`content_digest`; '' for a folder prepared before digests existed


def cache_key(builder_cls: type, root: str, scan: scan_lib.Scan) -> str:
    """Hex digest of the builder version, the real data path and the scanned file list.

    The path is resolved (``os.path.realpath``), so one folder reached by two
    spellings shares its prepared copy; files are hashed by their path relative
    to the data folder, their size and modification time. `root` is '' for
    builders without files (digits).
    """
    digest = hashlib.sha256()
    digest.update(f"{builder_cls.name}:{builder_cls.VERSION}:{os.path.realpath(root) if root else ''}\n".encode())
    digest.update(json.dumps(scan.class_names).encode())
    for split, examples in sorted(scan.splits.items()):
        for ex in examples:
            stat = os.stat(ex.path) if ex.path else None
            size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (0, 0)
            rel = os.path.relpath(ex.path, root) if ex.path else ""
            digest.update(f"{split}\0{ex.image_id}\0{ex.label}\0{rel}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def content_digest(class_names: list[str], split_digests: dict[str, str]) -> str:
    """What a prepared dataset holds, as a hex digest: its class names and every split's rows.

    A split's digest (written while preparing, in the tfds metadata as ``content_digests``) is the
    sha256 of its rows in order: image id, label, size and decoded pixels. Unlike the cache key (which
    hashes file sizes and modification times, to find a prepared copy without reading the images), it
    stays the same when the same images are copied anew, so a run resumes on a re-prepared copy.
    Returns '' when `split_digests` is empty (a folder prepared before digests existed).
    """
    if not split_digests:
        return ""
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    for split, value in sorted(split_digests.items()):
        digest.update(f"{split}\0{value}\n".encode())
    return f"content-{digest.hexdigest()[:16]}"


def _remove_abandoned(final: str) -> None:
    """Deletes temporary folders of `final` left by preparations whose process is gone (killed)."""
    folder, name = os.path.split(final)
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if not entry.startswith(f"{name}.tmp-"):
            continue
        try:
            pid = int(entry[len(name) + 5:].split("-")[0])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def prepare(builder: str, root: str, cache_dir: str, num_classes: int = 0) -> PreparedDataset:
    """Scans `root`, prepares it into `cache_dir` if not already there, and opens it.

    Args:
      builder: a :data:`BUILDERS` name: 'competition', 'folders' or 'digits' (config key data.builder).
      root: the data folder (config key data.dir); ignored for 'digits'. A packed data folder
        (:mod:`imgclf_jax.data.packed`) is opened as it is: nothing scanned or prepared.
      cache_dir: where prepared datasets live (config key data.cache_dir), '~' expanded.
      num_classes: data.num_classes; 0 = infer (competition: largest training label + 1;
        folders: the class folders). Competition labels must lie in 0..num_classes-1; folders
        must have that many class folders. Ignored for 'digits' (config.validate refuses it).

    Raises:
      DataError: from the scan (missing folder, malformed CSV, missing or corrupt image).
      ConfigError: cache_dir lies inside the data folder; an unknown builder (listing the names).
    """
    entry = BUILDERS[builder]
    builder_cls = entry.builder_cls
    if "dir" in entry.ignored_keys:
        root = ""
    if packed.is_packed(root):  # python -m imgclf_jax.pack read wrote it: prepared already
        folder, scan = packed.open_packed(builder, root, num_classes)
        return open_prepared(builder_cls, folder, scan)
    scan = entry.scan(root, num_classes)
    cache_dir = os.path.expanduser(cache_dir)
    if root and _is_inside(cache_dir, root):
        raise ConfigError(
            f"config key 'data.cache_dir' ({cache_dir}) lies inside data.dir ({root}); "
            "the data folder is never written to"
        )
    final = os.path.join(cache_dir, f"{builder_cls.name}-{cache_key(builder_cls, root, scan)}")
    _remove_abandoned(final)
    if not os.path.isdir(final):
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=cache_dir):
                pass
        except OSError as e:
            raise ConfigError(f"config key 'data.cache_dir' ({cache_dir}) cannot be written: "
                              f"{e.strerror}") from None
        free_before = disk.free_bytes(cache_dir)
        tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        total = sum(len(examples) for examples in scan.splits.values())
        source = f"from '{root}'" if root else "bundled with scikit-learn"
        print(f"preparing {total:,} images ({builder_cls.name} {source}) into {final} (once)",
              file=sys.stderr)
        try:
            tfds.disable_progress_bar()
            instance = builder_cls(scan=scan, data_dir=tmp, file_format="array_record")
            instance.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
            shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)
            manifest.write(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # a concurrent preparation finished first: use its result
                if not os.path.isdir(final):
                    raise
        except UserError:
            raise
        except Exception as e:
            if not disk.is_disk_full(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk.disk_full_error(
                f"the prepared copy of {total} images ('{final}')", cache_dir, _pixel_bytes(builder_cls, scan),
                "rerun the same command", elsewhere="set data.cache_dir to a folder on a larger disk",
                free=free_before, need_words="it needs up to") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_prepared(builder_cls, final, scan)


def _pixel_bytes(builder_cls: type, scan: scan_lib.Scan) -> int | None:
    """The decoded pixels' bytes of every image (H * W * 3), an upper bound of the prepared copy's size
    (zlib saves some). Reads only the image headers (about 1 s per 10,000 files); None if unknown."""
    from PIL import Image

    total = 0
    for examples in scan.splits.values():
        for ex in examples:
            if not ex.path:
                size = getattr(builder_cls, "SIZE", 0)
                total += size * size * 3
                continue
            try:
                with Image.open(ex.path) as image:
                    total += image.width * image.height * 3
            except (OSError, ValueError):
                pass
    return total or None


def warn_mixed_sizes(sizes: dict[str, int]) -> None:
    """One warning when images come in more than one size (they are all resized alike)."""
    if len(sizes) > 1:
        common = max(sizes, key=sizes.get)
        others = sum(sizes.values()) - sizes[common]
        print(f"warning: {others} of {sum(sizes.values())} images are not {common} (the most common "
              f"size); every image is resized to data.image_size", file=sys.stderr)


def open_prepared(builder_cls: type, path: str, scan: scan_lib.Scan) -> PreparedDataset:
    """Opens a prepared folder with ``tfds.data_source``; ids and labels come from the scan.

    The folder's files are checked against its checksum manifest first (every byte is read
    once: about 0.3 s for the 334 MB of the competition data). A folder prepared before
    manifests existed is checked by reading its first and last record of every split
    (which catches a truncated file, not garbage bytes inside one).

    Raises:
      DataError: the prepared folder is corrupt (a file missing, truncated or changed since
        preparation, unreadable metadata, or record counts that differ from the scan);
        the message names the folder to delete.
    """
    def corrupt(problem: str) -> DataError:
        return DataError(f"prepared dataset '{path}' is corrupt: {problem}; delete that folder to prepare "
                         "it again (the data folder is untouched)")

    if manifest.has_manifest(path):
        problem = manifest.verify(path)
        if problem is not None:
            raise corrupt(problem)
    try:
        sources = tfds.data_source(builder_cls.name, data_dir=path, try_gcs=False)
        metadata = builder_cls(data_dir=path).info.metadata
        class_names = metadata["class_names"]
        sizes = {split: len(sources[split]) for split in scan.splits}
        if not manifest.has_manifest(path):  # prepared before manifests: at least its ends must read
            for split, size in sizes.items():
                for index in {0, size - 1} if size else ():
                    sources[split][index]
    except Exception as e:  # tfds / array_record errors of a damaged folder
        text = str(e).strip().splitlines()
        raise corrupt(f"{type(e).__name__}: {text[0][:300] if text else ''}") from None
    warn_mixed_sizes(metadata.get("image_sizes", {}))
    splits = {}
    for split, examples in scan.splits.items():
        source = sources[split]
        if sizes[split] != len(examples):
            raise corrupt(f"it has {sizes[split]} {split} records, {len(examples)} expected")
        splits[split] = PreparedSplit(
            source=source,
            image_ids=[ex.image_id for ex in examples],
            labels=np.array([ex.label for ex in examples], dtype=np.int64),
        )
    return PreparedDataset(path=path, class_names=list(class_names), splits=splits, sources=dict(scan.sources),
                           content_digest=content_digest(class_names, metadata.get("content_digests", {})))
