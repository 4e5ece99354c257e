"""Shared fixtures: 2 forced CPU devices, the real data from ../shared, crafted folders."""

import os

# Before jax is imported anywhere: tests run data-parallel code on 2 host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from imgclf_jax import backend  # noqa: E402  (imports no jax, starts no backend)

backend.configure_xla()  # the XLA setting the command-line tools use, for in-process runs too

import csv
import pathlib
import shutil

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("IMGCLF_JAX_SHARED_DATA", ROOT.parent / "shared" / "data" / "deepfake-unibuc")
)


def read_rows(path: pathlib.Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        return [(r["image_id"], int(r["label"])) for r in csv.DictReader(f)]


def find_image(folder: pathlib.Path, image_id: str) -> pathlib.Path:
    return next(folder.glob(f"{image_id}.*"))


def copy_with_test_split(src: pathlib.Path, dst: pathlib.Path, stems: list[str]) -> list[pathlib.Path]:
    """Copies a competition folder to `dst` and adds test/: src's first validation images renamed to `stems`.

    Returns the new test image paths (test.csv is the caller's to write).
    """
    shutil.copytree(src, dst)
    (dst / "test").mkdir()
    paths = []
    for stem, image in zip(stems, sorted((src / "validation").iterdir())):
        paths.append(dst / "test" / f"{stem}{image.suffix}")
        shutil.copy(image, paths[-1])
    return paths


def data_config(builder, root, cache_dir, **changes):
    """The base config's ``data`` section for `builder` on `root`, with `changes` applied."""
    from imgclf_jax import config as config_lib

    c = config_lib.base_config().data
    c.builder, c.dir, c.cache_dir = builder, str(root), str(cache_dir)
    for key, value in changes.items():
        c[key] = value
    return c


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not (SHARED_DATA / "train.csv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set IMGCLF_JAX_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_competition(shared_data, tmp_path_factory) -> pathlib.Path:
    """A competition-layout copy of 40 real train images (8 per class) and 15 validation (3 per class).

    Rows keep the shared CSVs' relative order; train files are WebP, validation PNG, as in ../shared.
    """
    root = tmp_path_factory.mktemp("competition")
    for split, per_class in (("train", 8), ("validation", 3)):
        rows = read_rows(shared_data / f"{split}.csv")
        taken, counts = [], {}
        for image_id, label in rows:
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                taken.append((image_id, label))
        (root / split).mkdir()
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", "label"])
            for image_id, label in taken:
                src = find_image(shared_data / split, image_id)
                shutil.copy(src, root / split / src.name)
                writer.writerow([image_id, label])
    return root


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")
