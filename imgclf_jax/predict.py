"""Predict with a finished run: ``python -m imgclf_jax.predict --workdir DIR --images PATH --out FILE``.

`PATH` is one of:

- a folder of images (ids = file names without extension, sorted);
- a class-folder tree, ``PATH/<class>/<image>`` (ids ``<class>/<stem>``, sorted, as the
  ``folders`` builder makes them): the folder names are the images' labels;
- a CSV with an ``image_id`` column plus ``--image_dir DIR`` (default: the folder
  beside the CSV named after it, e.g. ``test.csv`` -> ``test/``), whose row order
  the output keeps; a ``label`` column, if filled in, gives the images' labels
  (class names as text; for the competition '0'..'4').

Writes ``image_id,label`` (Kaggle submission format) with the run's result
weights; each label is the class name, as in the run's own
submission.csv. When the images have labels (a class-folder tree, a CSV with labels),
it also prints the accuracy, the per-class accuracy with counts and the
confusion matrix, and writes ``<out stem>_confusion_matrix.json`` / ``.png``
beside FILE. A label or class folder that is not one of the run's classes
(names compared after Unicode NFC normalisation) stops with one line naming
it, before anything is predicted. So does a FILE (or a file written beside it)
that is an input image or the input CSV, lies inside the images folder, or is
one of the run's own files in the workdir (config.json, checkpoints/, ...; a
new file there, e.g. ``WORKDIR/val.csv``, is fine).

An ensemble run (``ensemble.num_members`` > 1) predicts with every member and
writes the run's vote (``ensemble.vote``: majority, ties by summed
probabilities, or soft), as its own submission.csv does; ``--members`` also
writes each member's predictions to ``<out stem>_member_<i>.csv``.

``--probabilities`` adds one column per class after the label, headed by the class
names (``image_id,label,<class 0>,...``): the softmax of the run's logits (with its
evaluation transform, e.g. the mean over flip TTA views, as validation computes them),
for an ensemble the mean of its members' (also with ``--members``: each member's own).
Such files are for blending models yourself; ``python -m imgclf_jax.vote --soft``
averages them. (Kaggle expects ``image_id,label`` only: submit a file written without
the flag.)

predict reads the run's config from the workdir (its config.json): it takes no
``--config``. Flags: ``--workdir``, ``--images``, ``--out`` (required),
``--image_dir``, ``--batch_size``, ``--members``, ``--probabilities``.

Images are read exactly as training's evaluation reads them (Pillow to 8-bit
RGB, resize to ``data.image_size`` with ``data.resize_method``, scale to
[0, 1], the run's per-channel normalization when it had one, no augmentation), through the same eval pipeline and eval step, so
predicting the validation folder reproduces the run's validation accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import unicodedata

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


@dataclasses.dataclass(frozen=True)
class ImageList:
    """The images to predict, in output order, with their labels where the input gives them.

    ``labels[i]`` is the label text (a class name) of image i, ``origins[i]`` where it
    came from, named in errors ("CSV file 'x.csv' line 5: label 'cat'", "class folder
    'd/cat'"); both are None for unlabelled images.
    """

    ids: list[str]
    paths: list[str]
    labels: list[str] | None = None
    origins: list[str] | None = None


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith((".", "__MACOSX")))


def list_images(images: str, image_dir: str | None) -> ImageList:
    """The images to predict: a folder's images sorted by id, a class-folder tree, or a CSV's rows in order.

    Raises:
      DataError: missing folder or CSV, malformed CSV, an id without an image file, a folder
        holding both images and subfolders, a CSV whose label column is filled in on some rows only.
    """
    exts = image_extensions()
    if os.path.isdir(images):
        files = scan_lib.index_folder(images, exts)
        classes = _subfolders(images)
        if files and classes:
            raise DataError(f"folder '{images}' holds both images and subfolders ({', '.join(classes[:3])}"
                            f"{', ...' if len(classes) > 3 else ''}): give a folder of images or a class-folder "
                            "tree (one subfolder of images per class), not both")
        if files:
            ids = sorted(files)
            return ImageList(ids, [files[i] for i in ids])
        if not classes:
            raise DataError(f"folder '{images}' holds no images")
        names, examples = scan_lib.class_tree(images, exts)
        if not examples:
            raise DataError(f"class folders under '{images}' ({', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''}) hold no images")
        return ImageList([e.image_id for e in examples], [e.path for e in examples],
                         [names[e.label] for e in examples],
                         [f"class folder '{os.path.join(images, names[e.label])}'" for e in examples])
    if not os.path.isfile(images):
        raise DataError(f"--images '{images}' is neither a folder nor a CSV file")
    labelled = scan_lib.has_labels(images)  # every row labelled; some rows only: a DataError
    rows = scan_lib.read_csv(images, need_label=labelled)
    folder = image_dir or os.path.splitext(images)[0]
    files = scan_lib.index_folder(folder, exts)
    ids, paths = [], []
    for line, image_id, _ in rows:
        image_id = scan_lib.strip_image_ext(image_id, exts)
        if image_id not in files:
            raise DataError(f"CSV file '{images}' line {line}: no image file for id '{image_id}' in '{folder}'")
        ids.append(image_id)
        paths.append(files[image_id])
    if not labelled:  # no label column, or an empty one (a test.csv with a blank label column)
        return ImageList(ids, paths)
    return ImageList(ids, paths, [text for _, _, text in rows],
                     [f"CSV file '{images}' line {line}: label '{text}'" for line, _, text in rows])


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def label_indices(images: ImageList, class_names: list[str]) -> np.ndarray:
    """``int64[N]``: each image's label as an index into the run's `class_names`.

    Names are matched as text after Unicode NFC normalisation of both sides, so a class
    folder copied on macOS (NFD: 'u' + combining diaeresis) matches the run's 'ü'; the
    outputs carry the run's own spelling (`class_names`).

    Raises:
      DataError: a label (CSV line) or class folder that is not one of `class_names`, named.
    """
    index = {_nfc(name): i for i, name in enumerate(class_names)}
    for text, origin in zip(images.labels, images.origins):
        if _nfc(text) not in index:
            shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
            raise DataError(f"{origin} is not one of the run's {len(class_names)} classes ({shown})")
    return np.array([index[_nfc(text)] for text in images.labels], np.int64)


def evaluation_table(truth: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> str:
    """A compact text report: accuracy, per-class accuracy with counts, the confusion matrix.

    Args:
      truth, predictions: ``int64[N]`` class indices into `class_names`.

    Returns:
      lines of text (no trailing newline); a class without images shows '-' as its accuracy.
    """
    from imgclf_jax.report import confusion_matrix

    matrix = confusion_matrix(truth, predictions, len(class_names))
    correct, total = int(np.trace(matrix)), int(matrix.sum())
    name_width = max(5, *(len(n) for n in class_names))
    lines = [f"accuracy {correct / total:.4f} ({correct} of {total} images)",
             f"{'class':<{name_width}}  accuracy  correct/images"]
    for i, name in enumerate(class_names):
        n = int(matrix[i].sum())
        acc = f"{matrix[i, i] / n:.4f}" if n else "-"
        lines.append(f"{name:<{name_width}}  {acc:>8}  {int(matrix[i, i])}/{n}")
    cell = max(len(str(int(matrix.max()))), *(len(n) for n in class_names))
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    lines.append(" " * name_width + "  " + " ".join(f"{n:>{cell}}" for n in class_names))
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{name_width}}  " + " ".join(f"{int(v):>{cell}}" for v in matrix[i]))
    return "\n".join(lines)


def _finished_run(workdir: str) -> dict:
    """The config (a dict, from config.json) of the finished run in `workdir`.

    Raises:
      ConfigError: naming what is missing (config.json, checkpoints/result, or both) or a
        config.json that cannot be read or is not a JSON object.
    """
    config_path = os.path.join(workdir, "config.json")
    result = os.path.join(workdir, "checkpoints", "result")
    has_config, has_result = os.path.isfile(config_path), os.path.isdir(result)
    if not has_config and not has_result:
        raise ConfigError(f"workdir '{workdir}' holds no run: no config.json and no result checkpoint "
                          "(checkpoints/result); give the --workdir that train wrote")
    if not has_config:
        raise ConfigError(f"workdir '{workdir}' has a result checkpoint but no config.json ('{config_path}' "
                          "is missing): predict needs the run's config; restore it or train again")
    if not has_result:
        raise ConfigError(f"workdir '{workdir}' has config.json but no result checkpoint ('{result}' is "
                          "missing): the run did not finish or its result was deleted; train again "
                          "(same --workdir resumes an unfinished run; --overwrite starts over)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{config_path}' cannot be read as the run's config ({type(e).__name__}: {e}); "
                          "it is damaged: restore it or train again with --overwrite") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{config_path}' is not a run's config (a JSON object); it is damaged: restore it "
                          "or train again with --overwrite")
    return config


def check_outputs(outputs: list[str], images: ImageList, images_arg: str, image_dir: str | None,
                  workdir: str) -> None:
    """Refuses output paths that would overwrite predict's inputs or the run's own files.

    Each path in `outputs` (--out and the side files predict would write beside it) is
    refused if it is (by os.path.realpath, or os.path.samefile for an existing file) the
    input CSV or one of the input images, if it lies inside the images folder (a flat
    folder or class-folder tree given as --images, or a CSV's image folder), or if it is
    one of the run's files in `workdir` (workdir.RUN_FILES, submission_member_<i>.csv,
    anything under checkpoints/). A new file in `workdir` (e.g. val.csv) is allowed.

    Raises:
      ConfigError: naming the output path and what it would overwrite.
    """
    from imgclf_jax import workdir as workdir_lib

    inputs = [images_arg] if os.path.isfile(images_arg) else []
    folder = images_arg if os.path.isdir(images_arg) else (image_dir or os.path.splitext(images_arg)[0])
    folder_real = os.path.realpath(folder)
    run_real = os.path.realpath(workdir)
    checkpoints_real = os.path.join(run_real, "checkpoints")
    by_real = {os.path.realpath(p): p for p in [*inputs, *images.paths]}
    by_inode = None
    for out in outputs:
        real = os.path.realpath(out)
        shown = f"--out '{out}'" if out == outputs[0] else f"'{out}' (written beside --out)"
        hit = by_real.get(real)
        if hit is None and os.path.isfile(real):  # a hard link to an input is the input too
            if by_inode is None:
                by_inode = {}
                for p in [*inputs, *images.paths]:
                    st = os.stat(p)
                    by_inode.setdefault((st.st_dev, st.st_ino), p)
            st = os.stat(real)
            hit = by_inode.get((st.st_dev, st.st_ino))
        if hit is not None:
            what = "the input CSV" if hit in inputs else "an input image"
            raise ConfigError(f"{shown} would overwrite {what} ('{hit}'): write the predictions elsewhere")
        if os.path.commonpath([folder_real, real]) == folder_real:
            raise ConfigError(f"{shown} lies inside the images folder '{folder}': write the predictions "
                              "outside it (predict never writes among its input images)")
        parent, name = os.path.split(real)
        if (parent == run_real and (name in workdir_lib.RUN_FILES or workdir_lib.RUN_FILE_PATTERN.fullmatch(name))) or (
                os.path.commonpath([checkpoints_real, real]) == checkpoints_real):
            raise ConfigError(f"{shown} would overwrite the run's own file "
                              f"'{os.path.join(workdir, os.path.relpath(real, run_real))}' "
                              f"in --workdir: give another name (a new file such as "
                              f"'{os.path.join(workdir, 'predictions.csv')}' is fine)")


def confusion_paths(out: str) -> list[str]:
    """The confusion-matrix files predict writes beside `out` for labelled images: ``<out stem>_confusion_matrix.json/png``."""
    stem = os.path.splitext(out)[0] + "_confusion_matrix"
    return [stem + ".json", stem + ".png"]


def run_metadata(workdir: str) -> dict:
    """The result checkpoint's metadata of the run in `workdir`: class_names, num_classes, num_members, config.

    Raises:
      ConfigError: `workdir` holds no finished run (names what is missing) or its config.json is damaged.
    """
    from imgclf_jax import checkpoint as ckpt_lib

    _finished_run(workdir)
    return ckpt_lib.RunCheckpoints(workdir).result_metadata()


def predict(workdir: str, ids: list[str], paths: list[str], batch_size: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of the images at `paths` with the run's result weights.

    Returns:
      (probabilities ``float32[N, C]``, or ``float32[K, N, C]`` (one row per member) for a
      K-member ensemble run; labels ``int64[N]``: the argmax, or the ensemble's ``ensemble.vote``).

    Raises:
      ConfigError: `workdir` holds no finished run (names what is missing) or its config.json is damaged.
      CheckpointError: the result checkpoint is corrupt (fails its checksums or orbax's restore).
    """
    import jax
    import ml_collections

    from imgclf_jax import checkpoint as ckpt_lib, parallel, steps
    from imgclf_jax.evaluation import evaluate
    from imgclf_jax.models import create_model

    config = ml_collections.ConfigDict(_finished_run(workdir))
    checkpoints = ckpt_lib.RunCheckpoints(workdir)
    if batch_size:
        config.train.batch_size = batch_size
    metadata = checkpoints.result_metadata()
    num_members = metadata.get("num_members", 1)
    model = create_model(config.model, metadata["num_classes"])
    mesh = parallel.make_mesh(config.train.batch_size)

    holds_variables = ckpt_lib.result_holds_variables(metadata)  # else the bare params tree of an older run

    def init(key):
        variables = steps.init_variables(model, key, config.data.image_size)
        return variables if holds_variables else variables["params"]

    if num_members == 1:
        abstract = jax.eval_shape(init, jax.random.key(0))
    else:  # an ensemble's result: every leaf stacked on a leading member axis
        abstract = jax.eval_shape(jax.vmap(init), jax.random.split(jax.random.key(0), num_members))
    params, _ = checkpoints.restore_result(ckpt_lib.abstract_like(abstract, parallel.replicated(mesh)),
                                           verified=True)  # result_metadata verified the folder
    checkpoints.close()
    loss_fn, eval_transform = steps.eval_hooks(config)  # the run's loss and evaluation transform
    split = Split(source=FileSource(tuple(paths)), records=np.arange(len(paths)),
                  labels=np.full(len(paths), -1, np.int64), image_ids=list(ids))
    if num_members == 1:
        eval_step = steps.jit_eval_step(model, config.model.l2, mesh, loss_fn=loss_fn, eval_transform=eval_transform)
        evaluation = evaluate(eval_step, params, split, config, mesh, desc="predict")
        return evaluation.probabilities, evaluation.predictions
    from imgclf_jax.ensemble import mapping, steps as ens_steps
    from imgclf_jax.ensemble.voting import vote

    mode = mapping.resolve_mapping(config.ensemble.mapping)
    eval_step = ens_steps.jit_eval_step(model, config.model.l2, mesh, mode, loss_fn=loss_fn,
                                        eval_transform=eval_transform)
    probabilities = evaluate(eval_step, params, split, config, mesh, desc="predict").probabilities
    return probabilities, vote(probabilities, config.ensemble.vote)


def member_path(out: str, member: int) -> str:
    """Where ``--members`` writes member `member`'s predictions: ``<out stem>_member_<i>.csv`` beside `out`."""
    return f"{os.path.splitext(out)[0]}_member_{member}.csv"


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    if any(w == "--config" or w.startswith(("--config=", "--config.")) for w in argv):
        raise ConfigError("predict takes no --config: it reads the run's config from --workdir (its "
                          "config.json); --config is for train, preview and summary")
    flags = {"workdir": str, "images": str, "image_dir": str, "out": str, "batch_size": int, "members": bool,
             "probabilities": bool}
    values, _ = cli.parse_flags(argv, flags, config_overrides=False)
    for name in ("workdir", "images", "out"):
        if values[name] is None:
            raise ConfigError(f"--{name} is required (usage: --workdir DIR --images PATH --out FILE)")
    if values["batch_size"] is not None and values["batch_size"] < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {values['batch_size']}")
    if os.path.isdir(values["out"]):
        raise ConfigError(f"--out '{values['out']}' is a folder; give a file name")
    images = list_images(values["images"], values["image_dir"])
    ids, paths = images.ids, images.paths
    from imgclf_jax import backend  # before jax starts its backends: XLA flags apply then

    backend.configure_xla()
    metadata = run_metadata(values["workdir"])
    class_names, num_members = metadata["class_names"], metadata.get("num_members", 1)
    if values["members"] and num_members == 1:
        raise ConfigError(f"--members needs an ensemble run; '{values['workdir']}' is a single model "
                          "(ensemble.num_members = 1)")
    if values["probabilities"] and {"image_id", "label"} & set(class_names):
        clash = sorted({"image_id", "label"} & set(class_names))[0]
        raise ConfigError(f"--probabilities: the run has a class named '{clash}', which is also a column of "
                          "the output; the probability columns are headed by the class names")
    truth = label_indices(images, class_names) if images.labels is not None else None
    outputs = [values["out"]] + (confusion_paths(values["out"]) if truth is not None else [])
    outputs += [member_path(values["out"], i) for i in range(num_members)] if values["members"] else []
    check_outputs(outputs, images, values["images"], values["image_dir"], values["workdir"])
    probabilities, labels = predict(values["workdir"], ids, paths, values["batch_size"])
    from imgclf_jax.report import write_submission

    if values["probabilities"]:  # the mean of the members' for an ensemble
        mean = probabilities if num_members == 1 else probabilities.mean(0)
    write_submission(values["out"], ids, labels, class_names,  # class names, as training's submission.csv
                     probabilities=mean if values["probabilities"] else None)
    print(f"wrote {values['out']} ({len(ids)} predictions)")
    members = probabilities.argmax(-1) if num_members > 1 else None  # int64[K, N]
    if values["members"]:
        for i, member_labels in enumerate(members):
            write_submission(member_path(values["out"], i), ids, member_labels, class_names,
                             probabilities=probabilities[i] if values["probabilities"] else None)
        print(f"wrote {member_path(values['out'], 0)} .. {member_path(values['out'], num_members - 1)} "
              f"({num_members} members)")
    if truth is not None:
        print(evaluation_table(truth, labels, class_names))
        if members is not None:
            print("member accuracies: " + ", ".join(f"{np.mean(m == truth):.4f}" for m in members))
        from imgclf_jax import report

        stem = os.path.splitext(os.path.basename(values["out"]))[0] + "_confusion_matrix"
        folder = os.path.dirname(os.path.abspath(values["out"]))
        accuracy = float(np.mean(labels == truth))
        report.save_confusion_matrix(report.confusion_matrix(truth, labels, len(class_names)), class_names,
                                     folder, f"{os.path.basename(os.path.normpath(values['images']))}: "
                                     f"accuracy {accuracy:.4f}", name=stem)
        print(f"wrote {os.path.join(os.path.dirname(values['out']), stem)}.json and .png")
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.predict")
