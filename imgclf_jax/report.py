"""What a run leaves in its workdir for people: JSON records, curves, a confusion matrix, a submission.

- ``history.json``: a list with one dict per epoch (``epoch`` 1-based, ``train_loss``,
  ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate``, ``seconds``);
- ``accuracy.png``, ``loss.png``: train and validation per epoch;
- ``confusion_matrix.json`` / ``.png``: counts, rows = true class, columns = predicted;
- ``submission.csv``: ``image_id,label`` in test order (Kaggle format); the label is the
  class name ('0'..'4' for the competition, the folder name for class folders).

JSON files are written to a temporary name and renamed, so a reader (or a
killed run) never sees half a file; a failed write removes its temporary file
(a full disk raises :class:`imgclf_jax.errors.DiskFullError`).
"""

from __future__ import annotations

import csv
import json
import os
import textwrap

import numpy as np

from imgclf_jax import disk, distributed
from imgclf_jax.errors import ConfigError


def write_atomically(path: str, write, newline=None) -> None:
    """Calls `write(file)` on ``<path>.tmp``, then renames it to `path`; removes the .tmp if anything fails.

    In a multi-process run only process 0 writes (:func:`imgclf_jax.distributed.is_primary`); the
    others return at once. The same holds for every file this module writes.

    Raises:
      DiskFullError: the filesystem is full or the quota spent (ENOSPC / EDQUOT).
    """
    if not distributed.is_primary():  # a multi-process run's files are process 0's to write
        return
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
    """Writes `value` as indented JSON, atomically (see :func:`write_atomically`)."""
    text = json.dumps(value, indent=2) + "\n"
    write_atomically(path, lambda f: f.write(text))


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


def _label_curve(plt, fig, ax, metric: str, title: str, title_size="large", **legend) -> None:
    """Labels a per-epoch curve plot (whole-number epochs) and lays it out."""
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    fig.tight_layout()


def _save(plt, figures: dict, workdir: str) -> None:
    for name, fig in figures.items():
        if distributed.is_primary():
            fig.savefig(os.path.join(workdir, name), dpi=100)
        plt.close(fig)


def curve_figures(history: list[dict], best_epoch: int | None = None, monitor: str = "") -> dict:
    """{"accuracy.png": Figure, "loss.png": Figure}: train vs validation per epoch.

    `best_epoch` (1-based; the early-stopping monitor's best epoch) is marked by a vertical line
    labelled with the monitor that chose it (e.g. 'val_loss') and the plot's validation figure there.
    """
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    figures = {}
    for metric, name in (("accuracy", "accuracy.png"), ("loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", label="validation")
        if best_epoch is not None:
            value = history[best_epoch - 1][f"val_{metric}"]
            ax.axvline(best_epoch, color="tab:red", ls=":", lw=1.5,
                       label=f"best epoch {best_epoch}" + (f" by {monitor}" if monitor else "")
                       + f" (val_{metric} {value:.4f})")
        _label_curve(plt, fig, ax, metric, f"{metric} per epoch")
        figures[name] = fig
    return figures


def plot_curves(history: list[dict], workdir: str, best_epoch: int | None = None, monitor: str = "") -> None:
    """Writes accuracy.png and loss.png (:func:`curve_figures`)."""
    _save(_pyplot(), curve_figures(history, best_epoch, monitor), workdir)


def member_curve_figures(history: list[dict], best_epochs: list | None = None,
                         result_vote: tuple[str, float] | None = None) -> dict:
    """An ensemble's {"accuracy.png", "loss.png"} figures: every member's train (dashed) and validation
    (solid) curve, each member's best epoch as a star on its validation curve (`best_epochs`, 1-based,
    None for a member without one).

    accuracy.png also shows the majority and soft vote validation accuracies per epoch (thick
    lines) and, when `result_vote` = (what, accuracy) is given, the result's vote as a horizontal
    line labelled "result: {what} {accuracy}" (what: e.g. "soft vote, members at their own best
    epochs"). `history` is an ensemble history (member metrics as lists).
    """
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    k = len(history[0]["val_accuracy"])
    colors = plt.get_cmap("tab10")
    figures = {}
    for metric, name in (("accuracy", "accuracy.png"), ("loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        starred = False
        for i in range(k):
            color = colors(i % 10)
            for split, style in (("train", "--"), ("val", "-")):
                values = [h[f"{split}_{metric}"][i] for h in history]
                values = [float("nan") if v is None else v for v in values]
                ax.plot(epochs, values, style, color=color, alpha=0.8, lw=1,
                        label=f"member {i}" if split == "val" else None)
            best = best_epochs[i] if best_epochs else None
            value = history[best - 1][f"val_{metric}"][i] if best else None
            if value is not None:
                ax.plot([best], [value], "*", color=color, ms=12, mec="black", mew=0.6, zorder=5)
                starred = True
        if starred:  # one legend entry for every member's star
            ax.plot([], [], "*", color="white", ms=12, mec="black", mew=0.6, label="member's best epoch")
        if metric == "accuracy":
            for rule, color in (("majority", "black"), ("soft", "dimgray")):
                ax.plot(epochs, [h[f"{rule}_val_accuracy"] for h in history], "o-", color=color, lw=2.5,
                        label=f"{rule} vote (validation)")
            if result_vote is not None:
                what, value = result_vote
                ax.axhline(value, color="tab:red", ls=":", lw=1.8, label=f"result: {what} {value:.4f}")
        _label_curve(plt, fig, ax, metric, f"{metric} per epoch, {k} members (dashed: train, solid: validation)",
                     title_size=9, fontsize=7, ncol=2)
        figures[name] = fig
    return figures


def plot_member_curves(history: list[dict], workdir: str, best_epochs: list | None = None,
                       result_vote: tuple[str, float] | None = None) -> None:
    """Writes an ensemble's accuracy.png and loss.png (:func:`member_curve_figures`)."""
    _save(_pyplot(), member_curve_figures(history, best_epochs, result_vote), workdir)


def _wrap(name: str, width: int = 14) -> str:
    """`name` in lines of `width` characters, at most 3: a longer name keeps its start and its end
    (names often differ only at the end: 'photos_2024_cat', 'photos_2024_dog'), the cut marked '…'."""
    name = str(name)
    lines = textwrap.wrap(name, width, break_long_words=True, break_on_hyphens=True)
    if len(lines) > 3:
        lines = [lines[0], lines[1][:width - 1] + "…", "…" + name[-(width - 1):]]
    return "\n".join(lines) or name


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str], title: str):
    """The confusion matrix drawn for any class count and name length (a matplotlib Figure).

    Cells are about 0.55 inch (smaller from 20 classes on, larger for names of several lines
    that are slanted); the figure grows with the class
    count and the longest name, with a minimum size; names are wrapped at 14 characters (3 lines
    at most); column names are rotated 45 degrees when they would not fit side by side; the title
    is wrapped to the figure's width.
    """
    plt = _pyplot()
    k = len(class_names)
    names = [_wrap(n) for n in class_names]
    longest = max(len(line) for n in names for line in n.split("\n"))
    tick_size = 8 if k <= 20 else max(4, 8 - (k - 20) // 10)
    char_in = tick_size * 0.6 / 72  # inches per character, about
    cell = 0.55 if k <= 20 else max(0.2, 11.0 / k)
    rotate = longest * char_in > cell * 0.9
    if rotate:  # slanted names sit side by side at cell * sin(45 deg): room for their lines
        lines = max(n.count("\n") + 1 for n in names)
        cell = max(cell, lines * tick_size * 1.25 / 72 / np.sin(np.radians(45)) * 1.1)
    label_in = longest * char_in + 0.1
    width = max(4.5, 1.2 + label_in + cell * k)
    height = max(3.5, 1.4 + (label_in * 0.75 if rotate else 0.3) + cell * k)
    fig, ax = plt.subplots(figsize=(width, height))
    ax.imshow(matrix, cmap="Blues")
    cell_size = min(8, max(4, int(cell * 72 / 3)))
    for i in range(k):
        for j in range(k):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=cell_size)
    ax.set_xticks(range(k), names, fontsize=tick_size)
    ax.set_yticks(range(k), names, fontsize=tick_size)
    if rotate:
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    title_size = 9
    ax.set_title(textwrap.fill(title, max(20, int(width * 72 / (title_size * 0.6)) - 4)), fontsize=title_size)
    fig.tight_layout()
    return fig


def save_confusion_matrix(matrix: np.ndarray, class_names: list[str], workdir: str, title: str,
                          name: str = "confusion_matrix") -> None:
    """Writes `name`.json (counts) and `name`.png (:func:`confusion_matrix_figure`) into the folder `workdir`."""
    write_json(os.path.join(workdir, f"{name}.json"), {
        "class_names": class_names,
        "rows": "true class",
        "columns": "predicted class",
        "counts": matrix.tolist(),
    })
    plt = _pyplot()
    fig = confusion_matrix_figure(matrix, class_names, title)
    if distributed.is_primary():
        fig.savefig(os.path.join(workdir, f"{name}.png"), dpi=100)
    plt.close(fig)


def write_submission(path: str, image_ids: list[str], predictions, class_names: list[str],
                     probabilities=None) -> None:
    """Writes ``image_id,label`` rows: ids without extension, each label the predicted class's name.

    Args:
      path: the CSV file to write (atomically; its parent folder is created if needed).
      image_ids: N ids, in the order to write.
      predictions: N class indices (``int[N]``, 0..K-1).
      class_names: the K class names (the competition's are '0'..'4', so its labels stay integers;
        class folders' are their sorted folder names).
      probabilities: optional ``float[N, K]``; when given, K more columns headed by the class
        names (``image_id,label,<class 0>,...``) hold each row's class probabilities (see
        :func:`write_labels`).

    Raises:
      ConfigError: `path` is a folder, or (with `probabilities`) a class is named 'image_id' or 'label'.
      ValueError: a prediction outside 0..K-1 (a bug, not a user error).
      DiskFullError: no space left (no partial file is left).
    """
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
    if len(predictions) and (predictions.min() < 0 or predictions.max() >= len(class_names)):
        raise ValueError(f"predictions outside 0..{len(class_names) - 1}: {predictions.min()}..{predictions.max()}")
    write_labels(path, image_ids, [class_names[label] for label in predictions],
                 probabilities=probabilities, class_names=class_names if probabilities is not None else None)


def write_labels(path: str, image_ids: list[str], labels: list[str], probabilities=None,
                 class_names: list[str] | None = None) -> None:
    """Writes ``image_id,label`` rows with text labels (class names), atomically; creates the parent folder.

    With ``probabilities`` (``float[N, K]``) and the K ``class_names``, the header is
    ``image_id,label,<class 0>,...,<class K-1>`` and each row carries its K probabilities
    after the label, written with 7 significant digits (float32 holds about 7), so a
    row sums to 1 within about 1e-6 * K. :func:`imgclf_jax.vote.read_probabilities` reads
    such files back.

    Raises:
      ConfigError: `path` is a folder, or a class is named 'image_id' or 'label' (its column
        would be read as the id or label column).
      DiskFullError: no space left (no partial file is left).
    """
    if os.path.isdir(path):
        raise ConfigError(f"output '{path}' is a folder; give a file name such as {path}/submission.csv")
    header = ["image_id", "label"]
    if probabilities is not None:
        probabilities = np.asarray(probabilities, np.float64)
        if probabilities.shape != (len(image_ids), len(class_names)):
            raise ValueError(f"probabilities of shape {probabilities.shape} for {len(image_ids)} ids and "
                             f"{len(class_names)} classes")
        clash = [name for name in class_names if name in header]
        if clash:
            raise ConfigError(f"a class is named '{clash[0]}', which is also a column of '{path}': "
                              "probability columns are headed by the class names; rename that class folder")
        header += list(class_names)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(f) -> None:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        if probabilities is None:
            writer.writerows(zip(image_ids, labels))
        else:
            writer.writerows([image_id, label, *(format(p, ".7g") for p in row)]
                             for image_id, label, row in zip(image_ids, labels, probabilities))

    write_atomically(path, write, newline="")
