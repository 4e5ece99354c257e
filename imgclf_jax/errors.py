"""Errors that the command-line tools report in one line, without a traceback.

Every error a user can cause (a mistyped config key, a missing data folder, a
corrupt image) is raised as a subclass of :class:`UserError`; the CLIs catch
it, print ``<tool>: error: <message>`` and exit with status 2 (config) or 1
(data). Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input, reported in one line."""

    exit_code = 1


class ConfigError(UserError):
    """A bad command line or config: unknown key, wrong type, impossible value."""

    exit_code = 2


class DataError(UserError):
    """Bad or missing data: a missing folder or file, a malformed CSV, an unreadable image."""

    exit_code = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be restored: files missing, truncated or changed since they were written."""

    exit_code = 1


class DiskFullError(UserError):
    """A write failed because its filesystem is full (ENOSPC) or the user's quota is spent (EDQUOT)."""

    exit_code = 1


class WorkdirBusy(ConfigError):
    """Another run holds the workdir's lock (:mod:`imgclf_jax.workdir_lock`); nothing was touched."""


class TrainingError(UserError):
    """Training cannot go on (a NaN or infinite loss)."""

    exit_code = 1


class Interrupted(UserError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

    exit_code = 130


class ProcessLost(UserError):
    """A multi-process run lost one of its processes (killed, crashed, unreachable); the checkpoints stay intact.

    The tools exit at once after the message (``os._exit``): JAX's runtime would otherwise wait at its
    shutdown barrier for the missing process and then abort with a stack trace.
    """

    exit_code = 1


class PeerStopped(UserError):
    """Another process of a multi-process run stopped at a step every process takes together (its own
    message says why); this one stops too, with that process's exit code and no message of its own."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
