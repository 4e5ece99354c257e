"""One training process per workdir: an advisory lock (``fcntl.flock``) on ``WORKDIR/.train.lock``.

The lock is held for the whole run and released when the run ends, however it
ends: on return or exception :meth:`WorkdirLock.release` removes the file, and
when the process dies (``kill -9`` included) the kernel drops the lock with the
process's open files; a lock file left behind by a killed run is locked again
by the next run (its content, the old pid, is only a hint for the message).

flock locks belong to an open file description, so a second open-and-lock in
the same process conflicts too (that is what the tests use).
"""

from __future__ import annotations

import fcntl
import os

from imgclf_jax.errors import ConfigError, WorkdirBusy

LOCK_NAME = ".train.lock"


class WorkdirLock:
    """Context manager: ``with WorkdirLock(workdir): ...`` holds the workdir's lock inside the block.

    Creates `workdir` if needed. The lock file holds the holder's pid (text).

    Raises (on entering):
      WorkdirBusy: another open lock holds it; the message names the workdir and the holder's pid.
      ConfigError: the workdir cannot be created or the lock file cannot be written.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None
        self._created = False  # the lock made the workdir: an empty one is removed on release

    def acquire(self) -> None:
        """Takes the lock (non-blocking); see the class docstring for what it raises."""
        try:
            self._created = not os.path.isdir(self.workdir)
            os.makedirs(self.workdir, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    os.close(fd)
                    who = f" (pid {holder})" if holder else ""
                    raise WorkdirBusy(
                        f"workdir '{self.workdir}' is in use by another train process{who}; wait for it "
                        "to finish or stop it, or use another --workdir") from None
                # The holder before us may have removed the file between our open and our flock:
                # then we hold a lock on a deleted file; open the path again.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise ConfigError(f"--workdir '{self.workdir}' cannot be locked: {e.strerror}") from None
        self._fd = fd

    def release(self) -> None:
        """Removes the lock file and drops the lock (a no-op when not held).

        A workdir that the lock created and that is still empty (the run stopped before writing
        anything, e.g. on a data error) is removed too, so a failed start leaves no trace.
        """
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass  # the workdir went away or is read-only now: closing still drops the lock
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                os.rmdir(self.workdir)  # only if empty
            except OSError:
                pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
