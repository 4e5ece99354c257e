"""What a run leaves in its workdir for people: JSON records, curves, a confusion matrix, a submission.

- ``history.json``: a list with one dict per epoch (``epoch`` 1-based, ``train_loss``,
  ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate``, ``seconds``);
- ``accuracy.png``, ``loss.png``: train and validation per epoch;
- ``confusion_matrix.json`` / ``.png``: counts, rows = true class, columns = predicted;
- ``submission.csv``: ``image_id,label`` in test order (Kaggle format); the label is the
  class name ('0'..'4' for the competition, the folder name for class folders).

JSON files are written to a temporary name and renamed, so a reader (or a
killed run) never sees half a file.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from imgclf_jax.errors import ConfigError


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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


def save_confusion_matrix(matrix: np.ndarray, class_names: list[str], workdir: str, title: str,
                          name: str = "confusion_matrix") -> None:
    """Writes `name`.json (counts) and `name`.png into the folder `workdir`."""
    write_json(os.path.join(workdir, f"{name}.json"), {
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
    fig.savefig(os.path.join(workdir, f"{name}.png"), dpi=100)
    plt.close(fig)


def write_submission(path: str, image_ids: list[str], predictions, class_names: list[str]) -> None:
    """Writes ``image_id,label`` rows: ids without extension, each label the predicted class's name.

    Args:
      path: the CSV file to write (atomically; its parent folder is created if needed).
      image_ids: N ids, in the order to write.
      predictions: N class indices (``int[N]``, 0..K-1).
      class_names: the K class names (the competition's are '0'..'4', so its labels stay integers;
        class folders' are their sorted folder names).

    Raises:
      ConfigError: `path` is a folder.
      ValueError: a prediction outside 0..K-1 (a bug, not a user error).
    """
    if os.path.isdir(path):
        raise ConfigError(f"output '{path}' is a folder; give a file name such as {path}/submission.csv")
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
    if len(predictions) and (predictions.min() < 0 or predictions.max() >= len(class_names)):
        raise ValueError(f"predictions outside 0..{len(class_names) - 1}: {predictions.min()}..{predictions.max()}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", "label"])
        for image_id, label in zip(image_ids, predictions):
            writer.writerow([image_id, class_names[label]])
    os.replace(tmp, path)
