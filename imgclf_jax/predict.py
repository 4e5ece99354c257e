"""Predict with a finished run: ``python -m imgclf_jax.predict --workdir DIR --images PATH --out FILE``.

`PATH` is either a folder of images (ids = file names without extension,
sorted) or a CSV with an ``image_id`` column plus ``--image_dir DIR`` (default:
the folder beside the CSV named after it, e.g. ``test.csv`` -> ``test/``), whose
row order the output keeps. Writes ``image_id,label`` (Kaggle submission
format) with the run's result weights.

An ensemble run (``ensemble.num_members`` > 1) predicts with every member and
writes the run's vote (``ensemble.vote``: majority, ties by summed
probabilities, or soft), as its own submission.csv does.

Images are read exactly as training's evaluation reads them (Pillow to 8-bit
RGB, resize to ``data.image_size`` with ``data.resize_method``, scale to
[0, 1], no augmentation), through the same eval pipeline and eval step, so
predicting the validation folder reproduces the run's validation accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from imgclf_jax import cli
from imgclf_jax.data import scan as scan_lib
from imgclf_jax.data.imageio import image_extensions, load_rgb
from imgclf_jax.data.splits import Split
from imgclf_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class FileSource:
    """A random-access source over image files: ``source[i] = {'image': uint8[H, W, 3]}``."""

    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": load_rgb(self.paths[index])}


def list_images(images: str, image_dir: str | None) -> tuple[list[str], list[str]]:
    """(ids, paths) of the images to predict: a folder's images sorted by id, or a CSV's rows in order.

    Raises:
      DataError: missing folder or CSV, malformed CSV, an id without an image file.
    """
    exts = image_extensions()
    if os.path.isdir(images):
        files = scan_lib.index_folder(images, exts)
        if not files:
            raise DataError(f"folder '{images}' holds no images")
        ids = sorted(files)
        return ids, [files[i] for i in ids]
    if not os.path.isfile(images):
        raise DataError(f"--images '{images}' is neither a folder nor a CSV file")
    rows = scan_lib.read_csv(images, need_label=False)
    folder = image_dir or os.path.splitext(images)[0]
    files = scan_lib.index_folder(folder, exts)
    ids, paths = [], []
    for line, image_id, _ in rows:
        image_id = scan_lib.strip_image_ext(image_id, exts)
        if image_id not in files:
            raise DataError(f"CSV file '{images}' line {line}: no image file for id '{image_id}' in '{folder}'")
        ids.append(image_id)
        paths.append(files[image_id])
    return ids, paths


def predict(workdir: str, ids: list[str], paths: list[str], batch_size: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of the images at `paths` with the run's result weights.

    Returns:
      (probabilities ``float32[N, C]``, or ``float32[K, N, C]`` (one row per member) for a
      K-member ensemble run; labels ``int64[N]``: the argmax, or the ensemble's ``ensemble.vote``).

    Raises:
      ConfigError: `workdir` holds no finished run (no config.json or result checkpoint).
      CheckpointError: the result checkpoint is corrupt (fails its checksums or orbax's restore).
    """
    import jax
    import ml_collections

    from imgclf_jax import checkpoint as ckpt_lib, loop, parallel, steps
    from imgclf_jax.models import create_model

    config_path = os.path.join(workdir, "config.json")
    result_dir = os.path.join(workdir, "checkpoints", "result")
    if not os.path.exists(config_path) or not os.path.isdir(result_dir):
        raise ConfigError(f"workdir '{workdir}' holds no finished run (no config.json or result checkpoint)")
    checkpoints = ckpt_lib.RunCheckpoints(workdir)
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if batch_size:
        config.train.batch_size = batch_size
    metadata = checkpoints.result_metadata()
    num_members = metadata.get("num_members", 1)
    model = create_model(config.model, metadata["num_classes"])
    mesh = parallel.make_mesh(config.train.batch_size)

    def init(key):
        return steps.init_params(model, key, config.data.image_size)

    if num_members == 1:
        abstract = jax.eval_shape(init, jax.random.key(0))
    else:  # an ensemble's result: every leaf stacked on a leading member axis
        abstract = jax.eval_shape(jax.vmap(init), jax.random.split(jax.random.key(0), num_members))
    params, _ = checkpoints.restore_result(ckpt_lib.abstract_like(abstract, parallel.replicated(mesh)),
                                           verified=True)  # result_metadata verified the folder
    checkpoints.close()
    split = Split(source=FileSource(tuple(paths)), records=np.arange(len(paths)),
                  labels=np.full(len(paths), -1, np.int64), image_ids=list(ids))
    if num_members == 1:
        evaluation = loop.evaluate(steps.jit_eval_step(model, config.model.l2, mesh), params, split, config, mesh)
        return evaluation.probabilities, evaluation.predictions
    from imgclf_jax.ensemble import mapping, steps as ens_steps
    from imgclf_jax.ensemble.voting import vote

    mode = mapping.resolve_mapping(config.ensemble.mapping)
    eval_step = ens_steps.jit_eval_step(model, config.model.l2, mesh, mode)
    probabilities = loop.evaluate(eval_step, params, split, config, mesh).probabilities
    return probabilities, vote(probabilities, config.ensemble.vote)


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    flags = {"workdir": str, "images": str, "image_dir": str, "out": str, "batch_size": int}
    values, _ = cli.parse_flags(argv, flags, config_overrides=False)
    for name in ("workdir", "images", "out"):
        if values[name] is None:
            raise ConfigError(f"--{name} is required (usage: --workdir DIR --images PATH --out FILE)")
    if values["batch_size"] is not None and values["batch_size"] < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {values['batch_size']}")
    if os.path.isdir(values["out"]):
        raise ConfigError(f"--out '{values['out']}' is a folder; give a file name")
    ids, paths = list_images(values["images"], values["image_dir"])
    from imgclf_jax.models import fast_path  # before jax starts its backends: XLA flags apply then

    fast_path.configure_xla()
    _, labels = predict(values["workdir"], ids, paths, values["batch_size"])
    from imgclf_jax.report import write_submission

    write_submission(values["out"], ids, labels)
    print(f"wrote {values['out']} ({len(ids)} predictions)")
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.predict")
