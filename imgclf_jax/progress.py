"""Progress on stderr that suits where it goes: a tqdm bar on a terminal, plain lines in a log file.

A redirected stderr (``train ... 2> log``, nohup, CI) gets no carriage returns:
:class:`Bar` then writes one plain line every :data:`PLAIN_INTERVAL_S` seconds
and one when it closes, each with the images done, images/s and the fields of
:meth:`Bar.set_postfix`. :func:`eta_text` is the run's ETA shown after each epoch.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0  # seconds between plain lines (not a terminal)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


class Bar:
    """Progress of `total` items (images): ``update(n)``, ``set_postfix(**fields)``, ``close()``.

    On a terminal it is a tqdm bar that disappears when closed (the caller prints
    the outcome). Elsewhere it writes plain lines to `stream` (default stderr):
    ``"{desc}: {done:,}/{total:,} img (P%), R img/s, S s[, k v ...]"`` every
    `interval` seconds, and the same line (``done`` in place of the count) on close.
    """

    def __init__(self, total: int, desc: str, stream=None, interval: float = PLAIN_INTERVAL_S):
        self.total, self.desc, self.interval = int(total), desc, interval
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self.fields: dict = {}
        self.started = self._last = time.perf_counter()
        self._tqdm = None
        if _is_tty(self.stream):
            self._tqdm = tqdm(total=self.total, unit="img", desc=desc, dynamic_ncols=True, leave=False,
                              file=self.stream, mininterval=1.0)

    def update(self, n: int) -> None:
        """Counts `n` more items done."""
        self.done += int(n)
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._write(finished=False)

    def set_postfix(self, **fields) -> None:
        """Fields shown after the counts (e.g. the running loss and accuracy)."""
        self.fields = fields
        if self._tqdm is not None:
            self._tqdm.set_postfix(**fields, refresh=False)

    def line(self, finished: bool) -> str:
        """The plain line for the current state."""
        seconds = time.perf_counter() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        counts = (f"{self.done:,} img done" if finished
                  else f"{self.done:,}/{self.total:,} img ({100 * self.done / max(self.total, 1):.0f}%)")
        extra = "".join(f", {k} {v}" for k, v in self.fields.items())
        return f"{self.desc}: {counts}, {rate:,.0f} img/s, {seconds:.1f}s{extra}"

    def _write(self, finished: bool) -> None:
        print(self.line(finished), file=self.stream, flush=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Ends the bar (a terminal bar is erased; a plain stream gets the final line)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        elif self.stream is not None:
            self._write(finished=True)
            self.stream = None


def eta_text(epoch_seconds: list[float], epochs_left: int, early_stopping: bool) -> str:
    """The run's ETA from the mean epoch time so far, e.g. ``"run ETA 12 min (11 epochs left)"``.

    `epoch_seconds`: wall seconds of the epochs run (train and validation each).
    With early stopping the run may end sooner: the text says "at most".
    """
    if epochs_left <= 0:
        return "last epoch"
    left = f"{epochs_left} epoch{'s' if epochs_left > 1 else ''} left"
    if not epoch_seconds:
        return left
    seconds = sum(epoch_seconds) / len(epoch_seconds) * epochs_left
    if seconds < 90:
        span = f"{seconds:.0f} s"
    elif seconds < 90 * 60:
        span = f"{seconds / 60:.0f} min"
    else:
        span = f"{seconds / 3600:.1f} h"
    return f"run ETA {'at most ' if early_stopping else ''}{span} ({left})"
