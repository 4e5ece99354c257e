"""Full disks: recognising the error, measuring what is needed, and saying it in one line."""

from __future__ import annotations

import errno
import os
import shutil

from imgclf_jax.errors import DiskFullError

_CODES = (errno.ENOSPC, errno.EDQUOT)
# orbax/tensorstore report a failed write as ValueError("... No space left on device [os_error_code='28']").
_TEXTS = ("No space left on device", "Disk quota exceeded", f"os_error_code='{errno.ENOSPC}'",
          f"os_error_code='{errno.EDQUOT}'")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk or a spent quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _CODES:
            return True
        if any(text in str(exc) for text in _TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1024; B, KB, MB, GB, TB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent), or None if unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def folder_bytes(path: str) -> int:
    """Total size in bytes of the files under `path` (0 if it does not exist)."""
    total = 0
    for parent, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(parent, name))
            except OSError:
                pass
    return total


def disk_full_error(what: str, folder: str, need_bytes: int | None, advice: str,
                    elsewhere: str = "choose a folder on a larger disk", free: int | None = None,
                    need_words: str = "it needs about") -> DiskFullError:
    """The one-line error for a write that ran out of space.

    Args:
      what: what was being written, e.g. ``"checkpoint 'run/checkpoints/latest/16'"``.
      folder: the folder written to (its filesystem's free space is reported).
      need_bytes: the estimated size of what was written, or None if unknown.
      advice: what to do next, e.g. ``"rerun the same command to resume"``.
      elsewhere: the alternative to freeing space, e.g. ``"use a --workdir on a larger disk"``.
      free: the free bytes to report when measured before the write began (files still
        held open by the failed writer keep their space for a moment); None = measure now.
      need_words: how the need is introduced (``"it needs about"``, ``"it needs up to"``).
    """
    when = "was free when it started" if free is not None else "is free"
    free = free if free is not None else free_bytes(folder)
    need = f"{need_words} {format_bytes(need_bytes)}, " if need_bytes else ""
    have = f"{format_bytes(free)} {when}" if free is not None else "the free space is unknown"
    return DiskFullError(f"no space left on the disk of '{folder}' while writing {what}: {need}{have}; "
                         f"free some space (or {elsewhere}), then {advice}")
