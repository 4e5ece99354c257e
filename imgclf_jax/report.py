"""What a run leaves in its workdir for people: JSON records, curves, a confusion matrix, a submission.

- ``history.json``: a list with one dict per epoch (``epoch`` 1-based, ``train_loss``,
  ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate``, ``seconds``);
- ``accuracy.png``, ``loss.png``: train and validation per epoch;
- ``confusion_matrix.json`` / ``.png``: counts, rows = true class, columns = predicted;
- ``submission.csv``: ``image_id,label`` in test order (Kaggle format).

JSON files are written to a temporary name and renamed, so a reader (or a
killed run) never sees half a file; a failed write removes its temporary file
(a full disk raises :class:`imgclf_jax.errors.DiskFullError`).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from imgclf_jax import disk
from imgclf_jax.errors import ConfigError


def _write_atomically(path: str, write, newline=None) -> None:
    """Calls `write(file)` on ``<path>.tmp``, then renames it to `path`; removes the .tmp if anything fails.

    Raises:
      DiskFullError: the filesystem is full or the quota spent (ENOSPC / EDQUOT).
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", newline=newline) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and disk.is_disk_full(e):
            folder = os.path.dirname(os.path.abspath(path))
            raise disk.disk_full_error(f"'{path}'", folder, None, "rerun the same command",
                                       elsewhere="write to a folder on a larger disk") from None
        raise


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON, atomically (see :func:`_write_atomically`)."""
    text = json.dumps(value, indent=2) + "\n"
    _write_atomically(path, lambda f: f.write(text))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``int64[K, K]`` counts; row = true class, column = predicted class; every class present."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_curve(plt, fig, ax, metric: str, title: str, path: str, title_size="large", **legend) -> None:
    """Labels a per-epoch curve plot (whole-number epochs), saves it to `path` and closes it."""
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], workdir: str) -> None:
    """Writes accuracy.png and loss.png (train vs validation per epoch)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    for metric, name in (("accuracy", "accuracy.png"), ("loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", label="validation")
        _finish_curve(plt, fig, ax, metric, f"{metric} per epoch", os.path.join(workdir, name))


def plot_member_curves(history: list[dict], workdir: str) -> None:
    """An ensemble's accuracy.png and loss.png: every member's train (dashed) and validation (solid) curve.

    accuracy.png also shows the majority and soft vote validation accuracies
    (thick lines). `history` is an ensemble history (member metrics as lists).
    """
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    k = len(history[0]["val_accuracy"])
    colors = plt.get_cmap("tab10")
    for metric, name in (("accuracy", "accuracy.png"), ("loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i in range(k):
            color = colors(i % 10)
            for split, style in (("train", "--"), ("val", "-")):
                values = [h[f"{split}_{metric}"][i] for h in history]
                values = [float("nan") if v is None else v for v in values]
                ax.plot(epochs, values, style, color=color, alpha=0.8, lw=1,
                        label=f"member {i}" if split == "val" else None)
        if metric == "accuracy":
            for rule, color in (("majority", "black"), ("soft", "dimgray")):
                ax.plot(epochs, [h[f"{rule}_val_accuracy"] for h in history], "o-", color=color, lw=2.5,
                        label=f"{rule} vote (validation)")
        _finish_curve(plt, fig, ax, metric, f"{metric} per epoch, {k} members (dashed: train, solid: validation)",
                      os.path.join(workdir, name), title_size=9, fontsize=7, ncol=2)


def save_confusion_matrix(matrix: np.ndarray, class_names: list[str], workdir: str, title: str) -> None:
    """Writes confusion_matrix.json (counts) and confusion_matrix.png."""
    write_json(os.path.join(workdir, "confusion_matrix.json"), {
        "class_names": class_names,
        "rows": "true class",
        "columns": "predicted class",
        "counts": matrix.tolist(),
    })
    plt = _pyplot()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(k), class_names)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "confusion_matrix.png"), dpi=100)
    plt.close(fig)


def write_submission(path: str, image_ids: list[str], predictions: np.ndarray) -> None:
    """Writes ``image_id,label`` rows (ids without extension, integer labels, no index column).

    Creates the parent folder if needed.

    Raises:
      ConfigError: `path` is a folder.
      DiskFullError: no space left (no partial file is left).
    """
    if os.path.isdir(path):
        raise ConfigError(f"output '{path}' is a folder; give a file name such as {path}/submission.csv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(f) -> None:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", "label"])
        for image_id, label in zip(image_ids, predictions):
            writer.writerow([image_id, int(label)])

    _write_atomically(path, write, newline="")
