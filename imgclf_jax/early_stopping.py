"""Keras ``EarlyStopping`` semantics as a small, checkpointable state machine.

Source: keras.callbacks.EarlyStopping (Keras 3, ``min_delta=0``,
``baseline=None``, ``restore_best_weights=True``), as
../shared/seed-attempts.md specifies:

- mode 'min' for a loss, 'max' for an accuracy; an improvement is strictly
  better than the best so far (a tie is not);
- after each epoch ``wait += 1``; on an improvement the value, the epoch and
  the weights are kept and ``wait = 0``; otherwise training stops once
  ``wait >= patience`` (never after the first epoch);
- at the end of training, the best epoch's weights become the result.

Without a monitor (``train.early_stopping.monitor = ''``) it never stops and
the final weights are the result, but the best epoch is still tracked (by
validation accuracy) for reporting.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
    """State of early stopping; all fields are JSON-serializable (they go into checkpoints).

    monitor: 'val_loss', 'val_accuracy' or '' (off; tracks val_accuracy for reporting).
    patience: epochs without improvement before stopping.
    best: best monitored value so far; best_epoch: its 0-based epoch (-1 before any).
    wait: epochs since the last improvement.
    """

    monitor: str = ""
    patience: int = 0
    best: float | None = None
    best_epoch: int = -1
    wait: int = 0
    stopped: bool = False

    @property
    def tracked(self) -> str:
        """The history key compared between epochs."""
        return self.monitor or "val_accuracy"

    @property
    def mode(self) -> str:
        """'min' for a loss, 'max' for an accuracy."""
        return "min" if "loss" in self.tracked else "max"

    @property
    def restores_best(self) -> bool:
        """Whether the best epoch's weights (not the last) are the result."""
        return bool(self.monitor)

    def is_improvement(self, value: float) -> bool:
        """Whether `value` is strictly better than the best so far (NaN never is)."""
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        return value < self.best if self.mode == "min" else value > self.best

    def update(self, epoch: int, metrics: dict) -> bool:
        """Records one finished epoch (0-based); returns True if this epoch is the new best.

        Sets ``stopped`` when training should end after this epoch.
        """
        value = float(metrics[self.tracked])
        self.wait += 1
        if self.is_improvement(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        if self.monitor and self.wait >= self.patience and epoch > 0:
            self.stopped = True
        return False

    def state_dict(self) -> dict:
        """The state as a JSON-serializable dict (for checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "EarlyStopping":
        """Rebuilds the state saved by :meth:`state_dict`."""
        return cls(**state)
