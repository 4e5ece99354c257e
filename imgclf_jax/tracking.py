"""Experiment logs that other tools read: TensorBoard event files and a Keras-style ``metrics.csv``.

Every run (plain and ensemble) writes, in its workdir:

- ``metrics.csv``, in Keras ``CSVLogger``'s layout: a header ``epoch,<metric>,...`` with the metrics
  in sorted order (as CSVLogger sorts them), then one row per epoch; ``epoch`` is 0-based, as Keras
  writes it (history.json counts from 1). A plain run's columns: ``accuracy``, ``learning_rate``,
  ``loss``, ``seconds``, ``train_images_per_s``, ``val_accuracy``, ``val_loss`` (Keras's names:
  ``loss`` / ``accuracy`` are the training metrics). An ensemble's: ``member_<i>_<metric>`` for each
  member and ``majority_val_accuracy``, ``soft_val_accuracy``; a cell is empty where history.json
  has null (a member that did not train that epoch).
- ``tensorboard/``: event files (tensorboardX's writer; no TensorFlow needed), for
  ``tensorboard --logdir runs``. Per-epoch scalars at step = epoch (1-based, as history.json):
  ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy``, ``learning_rate``,
  ``train/images_per_s``; every ``train.log_every_steps`` updates ``train/loss_per_step`` at step =
  the update count (the mean loss over the updates since the previous point or the epoch's start);
  the resolved config as text (``config``, step 0); the preview grid (``preview``, step 0: the first
  training images of epoch 1, as :mod:`imgclf_jax.preview` draws them) and the confusion matrix
  (``confusion_matrix``, step = epochs run) as images. An ensemble writes each member's scalars in
  ``tensorboard/member_<i>/`` with the plain tags (so TensorBoard overlays the members like runs),
  each vote's ``val/accuracy`` in ``tensorboard/vote_majority/`` and ``vote_soft/``, and the config,
  the preview (member 0's stream) and the vote's confusion matrix in ``tensorboard/``.

Resuming: whenever a process starts a run, :class:`RunLog` removes ``tensorboard/`` and writes it
again from the checkpoint's record (history and the per-step points are in the checkpoint's
progress), then goes on appending. So a resumed run's logs hold the same points as an uninterrupted
run's, each once (nothing logged after the last checkpoint by a killed process survives twice); each
event file starts with TensorBoard's restart marker, so a TensorBoard already watching drops what it had
read of the run and shows the rewritten log;
``metrics.csv`` is rewritten from the history after every epoch.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Any

import numpy as np

from imgclf_jax import distributed, report

TENSORBOARD_DIR = "tensorboard"
METRICS_CSV = "metrics.csv"

# history.json key -> (Keras CSVLogger column, TensorBoard tag); keys absent here are not logged.
_METRICS = {
    "train_loss": ("loss", "train/loss"),
    "train_accuracy": ("accuracy", "train/accuracy"),
    "val_loss": ("val_loss", "val/loss"),
    "val_accuracy": ("val_accuracy", "val/accuracy"),
    "learning_rate": ("learning_rate", "learning_rate"),
    "train_images_per_s": ("train_images_per_s", "train/images_per_s"),
    "seconds": ("seconds", None),
}
VOTE_KEYS = {"majority_val_accuracy": "majority", "soft_val_accuracy": "soft"}


def csv_columns(entry: dict) -> dict[str, Any]:
    """One history entry (plain or ensemble, see history.json) as ``{metrics.csv column: value}``.

    Per-member lists become ``member_<i>_<column>``; None (JSON null) stays None (an empty cell).
    """
    row = {}
    for key, value in entry.items():
        if key in VOTE_KEYS:
            row[key] = value
        elif key in _METRICS:
            column = _METRICS[key][0]
            if isinstance(value, list):
                row.update({f"member_{i}_{column}": v for i, v in enumerate(value)})
            else:
                row[column] = value
    return row


def write_metrics_csv(path: str, history: list[dict]) -> None:
    """Writes the whole `history` to `path` in Keras CSVLogger's layout (see the module docstring), atomically."""
    rows = [csv_columns(entry) for entry in history]
    columns = sorted({c for row in rows for c in row})

    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(["epoch", *columns])
        for epoch, row in enumerate(rows):
            writer.writerow([epoch, *("" if row.get(c) is None else row[c] for c in columns)])

    report.write_atomically(path, write, newline="")


def epoch_scalars(entry: dict) -> dict[str, dict[str, float]]:
    """One history entry as ``{log folder under tensorboard/ ('' = the run's own): {tag: value}}``;
    None values (a member that did not train) are left out."""
    out: dict[str, dict[str, float]] = {}
    for key, value in entry.items():
        if key in VOTE_KEYS:
            out.setdefault(f"vote_{VOTE_KEYS[key]}", {})["val/accuracy"] = value
        elif key in _METRICS and _METRICS[key][1] is not None:
            tag = _METRICS[key][1]
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                folder = f"member_{i}" if isinstance(value, list) else ""
                if v is not None:
                    out.setdefault(folder, {})[tag] = float(v)
    return out


def window_losses(totals: dict, base: dict | None) -> list[float | None]:
    """The mean training loss per stream (1 for a plain run, K for an ensemble) since `base`.

    totals, base: running sums of the epoch (``loss_sum``, ``count``: floats, or lists of K floats);
    base None = the epoch's start. A stream with no images since `base` (a stopped member) gives None.
    """
    loss = np.atleast_1d(np.asarray(totals["loss_sum"], np.float64))
    count = np.atleast_1d(np.asarray(totals["count"], np.float64))
    if base is not None:
        loss = loss - np.atleast_1d(np.asarray(base["loss_sum"], np.float64))
        count = count - np.atleast_1d(np.asarray(base["count"], np.float64))
    return [float(s / c) if c > 0 else None for s, c in zip(loss, count)]


def _png_array(path: str) -> np.ndarray:
    """``uint8[H, W, 3]`` pixels of a PNG (PIL)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class RunLog:
    """The TensorBoard log of one run in ``<workdir>/tensorboard`` (see the module docstring).

    Args:
      workdir: the run's folder.
      num_members: K of an ensemble (member folders), 1 for a plain run.

    In a multi-process run only process 0 logs (:func:`imgclf_jax.distributed.is_primary`); on the
    others every method does nothing.
    """

    def __init__(self, workdir: str, num_members: int):
        self.root = os.path.join(workdir, TENSORBOARD_DIR)
        self.num_members = num_members
        self._writers: dict[str, Any] = {}
        self.active = distributed.is_primary()

    def _writer(self, folder: str):
        if folder not in self._writers:
            from tensorboardX import SummaryWriter  # here: protobuf is slow to import

            # purge_step=0: each file starts with TensorBoard's restart marker (SessionLog START), so a
            # TensorBoard watching the run drops what it had read of it and reads the rewritten log anew.
            self._writers[folder] = SummaryWriter(os.path.join(self.root, folder) if folder else self.root,
                                                  purge_step=0, flush_secs=30)
        return self._writers[folder]

    def start(self, config_dict: dict, history: list[dict], step_points: list, preview_png: str | None) -> None:
        """Writes the log again from a run's record: removes ``tensorboard/``, then logs the config,
        the preview grid (a PNG path, or None), every epoch of `history` and every per-step point
        (``[update, [loss per stream]]``) so far."""
        if not self.active:
            return
        self.close()
        if os.path.isdir(self.root):
            shutil.rmtree(self.root)
        text = json.dumps(config_dict, indent=2)
        self._writer("").add_text("config", "```\n" + text + "\n```", 0)
        if preview_png is not None and os.path.isfile(preview_png):
            self._writer("").add_image("preview", _png_array(preview_png), 0, dataformats="HWC")
        for entry in history:
            self.epoch(entry, flush=False)
        for update, losses in step_points:
            self.step_loss(update, losses, flush=False)
        self.flush()

    def epoch(self, entry: dict, flush: bool = True) -> None:
        """Logs one history entry's scalars at step = its epoch (1-based)."""
        if not self.active:
            return
        for folder, scalars in epoch_scalars(entry).items():
            writer = self._writer(folder)
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, entry["epoch"])
        if flush:
            self.flush()

    def step_loss(self, update: int, losses: list, flush: bool = False) -> None:
        """Logs ``train/loss_per_step`` at step `update`, per stream (member folders for an ensemble)."""
        if not self.active:
            return
        for i, loss in enumerate(losses):
            if loss is not None:
                self._writer(f"member_{i}" if self.num_members > 1 else "").add_scalar(
                    "train/loss_per_step", loss, update)
        if flush:
            self.flush()

    def confusion_matrix(self, png: str, epochs_run: int) -> None:
        """Logs the run's confusion_matrix.png as the ``confusion_matrix`` image at step `epochs_run`."""
        if not self.active:
            return
        if os.path.isfile(png):
            self._writer("").add_image("confusion_matrix", _png_array(png), epochs_run, dataformats="HWC")
        self.flush()

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def read_events(folder: str) -> list[tuple[str, int, Any]]:
    """Every point in the event files directly in `folder`, in file and write order:
    ``(tag, step, value)`` with value a float (scalar), a str (text) or ``'image'``.

    A plain reader of TensorBoard's record framing (length, CRC, event, CRC; CRCs not checked) and
    its Event protobuf (tensorboardX's copy), for tests and tools that must not need TensorBoard.
    """
    import struct

    from tensorboardX.proto import event_pb2

    points = []
    for name in sorted(n for n in os.listdir(folder) if n.startswith("events.out.tfevents")):
        with open(os.path.join(folder, name), "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    if value.HasField("image"):
                        points.append((value.tag, event.step, "image"))
                    elif value.HasField("simple_value"):
                        points.append((value.tag, event.step, value.simple_value))
                    elif value.metadata.plugin_data.plugin_name == "text":
                        points.append((value.tag, event.step, value.tensor.string_val[0].decode()))
                    elif value.HasField("tensor") and value.tensor.float_val:
                        points.append((value.tag, event.step, value.tensor.float_val[0]))
    return points
