"""orbax checkpoints of a run: the latest state (for resuming) and the result (for predicting).

Layout in the workdir::

  checkpoints/latest/<updates done>/   state (step, params, opt_state, model_state, ema), best weights when early
                                      stopping restores them, and JSON loop state (history,
                                      early stopping); the two latest are kept, so a corrupt
                                      newest one falls back to the one before
  checkpoints/result/                 the result variables and JSON metadata (class names, ...)
  checkpoints/MANIFESTS               a marker: this workdir's checkpoints carry manifests

Every checkpoint folder gets a checksum manifest (:mod:`imgclf_jax.manifest`:
the size and sha256 of each of its files) once orbax has written it; it is
checked before anything is restored, so truncated files, garbage bytes or a
deleted sub-folder stop with one line (:class:`CheckpointError`) instead of
restoring silently or failing deep inside orbax. Before the first save,
``checkpoints/MANIFESTS`` records that the workdir's checkpoints carry
manifests; from then on a checkpoint folder without one (its manifest deleted,
or a kill -9 between orbax finishing and the manifest being written) is corrupt,
as is a latest step without one beside a step that has one. Only a workdir of
checkpoints written before manifests existed (no marker, no manifest anywhere)
restores unverified (orbax's own errors still become one line); its folders get
manifests when the marker is first written.

Restoring takes an abstract target (``jax.ShapeDtypeStruct`` leaves carrying the
current shardings), so a checkpoint written with one device count restores
with another. Saves are synchronous: once ``save_*`` returns, the checkpoint is
complete on disk (orbax writes to a temporary folder and renames it). A save
that fails (a full disk: :class:`DiskFullError`) removes its temporary folder.

In a multi-process run (:mod:`imgclf_jax.distributed`) every process calls every method: orbax's
multi-process path writes each global array once, and process 0 alone writes the manifests and the
marker and deletes folders, with a barrier after, so a checkpoint written by N processes restores
with M (the arrays are replicated; the abstract target carries the current mesh).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from imgclf_jax import disk, distributed, manifest
from imgclf_jax.errors import CheckpointError, UserError

# In checkpoints/: its presence says every checkpoint folder of the workdir carries a manifest.
MARKER_NAME = "MANIFESTS"
_MARKER_TEXT = (
    f"Written by imgclf_jax: every checkpoint folder under this folder (latest/<step>/, result/) carries a "
    f"checksum manifest, {manifest.MANIFEST_NAME}.\nA checkpoint folder here without one is treated as corrupt "
    "instead of being restored unverified. Deleting this file does not make it restorable.\n")

# Resuming needs one good checkpoint; the one before it is the fallback if the newest is corrupt.
LATEST_TO_KEEP = 2


# The problem of a folder without a manifest in a workdir whose checkpoints carry them.
_NO_MANIFEST = f"its checksum manifest {manifest.MANIFEST_NAME} is missing, so it cannot be verified"


def abstract_like(tree: Any, sharding) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of `tree`'s shapes and dtypes, placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array leaf of `tree` (its size in a checkpoint, uncompressed)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _remove_temporary(folder: str, name: str, settle_s: float = 0.5, limit_s: float = 10.0) -> None:
    """Deletes orbax's temporary folders ``<name>.orbax-checkpoint-tmp*`` in `folder`.

    After a failed save, tensorstore writes still in flight may recreate parts of
    the folder for a moment: removal repeats until none has reappeared for
    `settle_s` seconds (at most `limit_s`).
    """
    started = quiet_since = time.monotonic()
    while os.path.isdir(folder) and time.monotonic() - started < limit_s:
        found = [e for e in os.listdir(folder) if e.startswith(f"{name}.orbax-checkpoint-tmp")]
        for entry in found:
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        now = time.monotonic()
        if found:
            quiet_since = now
        elif now - quiet_since >= settle_s:
            return
        time.sleep(0.05)


class _OrbaxNoise(logging.Filter):
    """Drops orbax's log lines about what this module reports itself in one line: a write that
    failed on a full disk, and an unparsable or missing checkpoint metadata file (a corrupt checkpoint)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and disk.is_disk_full(record.exc_info[1]):
            return False
        text = record.getMessage()
        return not (disk.is_disk_full(Exception(text)) or text.startswith("Failed to json parse Metadata file")
                    or text.startswith("Metadata file does not exist"))


@contextlib.contextmanager
def _quiet_orbax():
    """Within: :class:`_OrbaxNoise` filters the absl and root loggers and their handlers."""
    noise = _OrbaxNoise()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for logger in loggers:
        logger.addFilter(noise)
        for handler in logger.handlers:
            handler.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
            for handler in logger.handlers:
                handler.removeFilter(noise)


def _event_loop_closed_filter(previous):
    """An unraisable hook that drops 'Event loop is closed' errors and passes the rest to `previous`."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def _orbax_quiet_on_disk_full():
    """While saving: orbax's own log lines about a full disk are dropped (a DiskFullError says it).

    When a save fails on a full disk, tensorstore callbacks of writes still in
    flight hit orbax's closed event loop and print 'Event loop is closed'
    tracebacks, during the save and for a moment after: those (only those) are
    dropped, and stay dropped once such a failure happened (the run is ending).
    """
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _event_loop_closed_filter(previous_hook)
    full = False
    try:
        with _quiet_orbax():
            yield
    except BaseException as e:
        full = disk.is_disk_full(e)
        raise
    finally:
        if not full:
            sys.unraisablehook = previous_hook


class RunCheckpoints:
    """The checkpoints of one workdir; a context manager that closes them on every exit
    (``with RunCheckpoints(workdir) as checkpoints: ...``)."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self._manager = None

    @property
    def _latest(self) -> ocp.CheckpointManager:
        """The manager of checkpoints/latest, made on first use (predicting never creates the folder)."""
        if self._manager is None:
            with _quiet_orbax():  # it reads every step's metadata: a corrupt one is reported on restore
                self._manager = ocp.CheckpointManager(
                    self.latest_dir,
                    options=ocp.CheckpointManagerOptions(max_to_keep=LATEST_TO_KEEP,
                                                         enable_async_checkpointing=False),
                )
        return self._manager

    @property
    def latest_dir(self) -> str:
        """``<workdir>/checkpoints/latest``: one folder per kept checkpoint, named by its step."""
        return os.path.join(self.workdir, "checkpoints", "latest")

    @property
    def result_dir(self) -> str:
        """``<workdir>/checkpoints/result``: the result params and metadata."""
        return os.path.join(self.workdir, "checkpoints", "result")

    @property
    def marker_path(self) -> str:
        """``<workdir>/checkpoints/MANIFESTS``: present once the workdir's checkpoints carry manifests."""
        return os.path.join(self.workdir, "checkpoints", MARKER_NAME)

    def _kept_steps(self) -> list[str]:
        """Folders of the finished steps in checkpoints/latest (orbax's temporary folders aside)."""
        if not os.path.isdir(self.latest_dir):
            return []
        return [os.path.join(self.latest_dir, n) for n in sorted(os.listdir(self.latest_dir))
                if n.isdigit() and os.path.isdir(os.path.join(self.latest_dir, n))]

    def _mark_manifests(self) -> None:
        """Writes checkpoints/MANIFESTS (atomically) unless present, before a save writes a manifest.

        Checkpoint folders already there without a manifest (a workdir of checkpoints written before
        manifests existed: until now they restored unverified) get one first, so they stay restorable.

        Raises:
          OSError: the marker or a manifest cannot be written (e.g. ENOSPC; no temporary file is left).
        """
        if os.path.isfile(self.marker_path) or not distributed.is_primary():
            return
        for folder in self._kept_steps() + [self.result_dir]:
            if os.path.isdir(folder) and not manifest.has_manifest(folder):
                manifest.write(folder)
        os.makedirs(os.path.dirname(self.marker_path), exist_ok=True)
        tmp = f"{self.marker_path}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(_MARKER_TEXT)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.marker_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _manifests_required(self) -> bool:
        """Whether a checkpoint folder without a manifest is corrupt: the marker, or a latest step with one."""
        return os.path.isfile(self.marker_path) or any(manifest.has_manifest(f) for f in self._kept_steps())

    def step_dir(self, step: int) -> str:
        """The folder of the latest-checkpoint of `step`."""
        return os.path.join(self.latest_dir, str(step))

    def latest_step(self) -> int | None:
        """Optimizer updates done in the latest checkpoint, or None if there is none."""
        if self._manager is None and not os.path.isdir(self.latest_dir):
            return None  # not creating the folder (train.keep_checkpoints='result' removed it)
        with _quiet_orbax():
            return self._latest.latest_step()

    def _save_failed(self, exc: BaseException, folder: str, name: str, what: str, need: int, advice: str):
        """Cleans up after a failed save; returns the error to raise instead (or None: re-raise)."""
        if distributed.is_primary():
            _remove_temporary(folder, name)
        if disk.is_disk_full(exc):
            return disk.disk_full_error(what, folder, need, advice, elsewhere="use a --workdir on a larger disk")
        return None

    def save_latest(self, step: int, state: Any, best_params: Any | None, loop_state: dict) -> None:
        """Saves the state after `step` updates, then its manifest; the oldest beyond LATEST_TO_KEEP goes.

        Before the first save of a workdir, checkpoints/MANIFESTS is written (:meth:`_mark_manifests`).

        Raises:
          DiskFullError: no space left (orbax's temporary folder is removed; the earlier
            checkpoints stay intact).
        """
        items = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop_state)}
        if best_params is not None:
            items["best_params"] = ocp.args.StandardSave(best_params)
        folder = self.step_dir(step)
        previous = self.latest_step()
        need = (disk.folder_bytes(self.step_dir(previous)) if previous is not None
                else tree_nbytes(state) + tree_nbytes(best_params))
        try:
            self._mark_manifests()
            with _orbax_quiet_on_disk_full():
                self._latest.save(step, args=ocp.args.Composite(**items), force=True)
                self._latest.wait_until_finished()
            if distributed.is_primary():
                manifest.write(folder)
            distributed.barrier(f"checkpoint {step} verified")
        except BaseException as e:
            if distributed.is_primary() and os.path.isdir(folder) and not manifest.has_manifest(folder):
                shutil.rmtree(folder, ignore_errors=True)  # complete but unverifiable: not kept
                self._latest.reload()
            error = self._save_failed(e, self.latest_dir, str(step), f"checkpoint '{folder}'", need,
                                      "rerun the same command to resume from the last checkpoint")
            if error is None:
                raise
            raise error from None

    def _restore_step(self, step: int, abstract_state: Any, abstract_best: Any | None) -> tuple:
        try:
            return self._restore_items(step, abstract_state, abstract_best)
        except Exception as error:
            legacy = _legacy_targets(abstract_state, abstract_best)
            if legacy is None:
                raise
            try:  # a checkpoint written before the state had model_state and EMA (and best weights variables)
                state, best, loop = self._restore_items(step, legacy[0], legacy[1])
            except Exception:
                raise error from None
            return _from_legacy(abstract_state, state), _best_from_legacy(abstract_best, best), loop

    def _restore_items(self, step: int, abstract_state: Any, abstract_best: Any | None) -> tuple:
        items = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
        # save_latest writes best_params only once there is a best epoch: a run interrupted inside its first
        # epoch has none yet, and resumes with none, as it started
        has_best = os.path.isdir(os.path.join(self.step_dir(step), "best_params"))
        if abstract_best is not None and has_best:
            items["best_params"] = ocp.args.StandardRestore(abstract_best)
        restored = self._latest.restore(step, args=ocp.args.Composite(**items))
        best = restored["best_params"] if "best_params" in items else None
        return restored["state"], best, restored["loop"]

    def restore_latest(self, abstract_state: Any, abstract_best: Any | None) -> tuple[Any, Any, dict]:
        """Restores (state, best params or None, loop state) of the newest checkpoint that verifies.

        A newest checkpoint that fails its manifest check, lacks its manifest where the workdir's
        checkpoints carry them (:meth:`_manifests_required`), or fails orbax's restore, is
        reported in one line on stderr and deleted once an older one restores
        (the run then repeats the steps in between, with identical results).

        Raises:
          CheckpointError: no kept checkpoint restores; names the newest one's folder and problem.
        """
        failed = []
        with _quiet_orbax():
            steps = sorted(self._latest.all_steps(), reverse=True)
        required = self._manifests_required()
        for step in steps:
            folder = self.step_dir(step)
            problem = None
            if manifest.has_manifest(folder):
                problem = manifest.verify(folder)
            elif required:
                problem = _NO_MANIFEST
            if problem is None:
                try:
                    with _quiet_orbax():
                        restored = self._restore_step(step, abstract_state, abstract_best)
                except UserError:
                    raise
                except Exception as e:  # orbax/tensorstore/json errors of a damaged folder
                    problem = f"orbax cannot restore it ({_one_line(e)})"
            if problem is None:
                if failed:  # every process reached the same verdict from the same files
                    distributed.barrier("checkpoints verified")
                    if distributed.is_primary():
                        for bad_folder, _ in failed:
                            shutil.rmtree(bad_folder, ignore_errors=True)
                    distributed.barrier("corrupt checkpoints deleted")
                    self._latest.reload()
                    print(f"warning: checkpoint '{failed[0][0]}' is corrupt ({failed[0][1]}); deleted it and "
                          f"resuming from the previous checkpoint '{folder}'", file=sys.stderr)
                return restored
            failed.append((folder, problem))
        if not failed:
            raise CheckpointError(f"no checkpoint in '{self.latest_dir}'")
        folder, problem = failed[0]
        earlier = " (and no earlier checkpoint restores)" if len(failed) > 1 else " (there is no earlier one)"
        raise CheckpointError(
            f"checkpoint '{folder}' is corrupt: {problem}{earlier}; delete '{self.latest_dir}' to train this "
            f"run again from the start, or rerun with --overwrite")

    def save_result(self, variables: Any, metadata: dict) -> None:
        """Writes the result weights and metadata (and its manifest), replacing an earlier result.

        `variables` are flax variables ``{'params': ..., **model_state}`` (leaves stacked per member for an
        ensemble); the metadata gets ``"weights": "variables"`` to say so (a result written before variables
        existed holds the bare params tree and has no such key: :func:`result_holds_variables`).

        Before the first save of a workdir, checkpoints/MANIFESTS is written (:meth:`_mark_manifests`).

        Raises:
          DiskFullError: no space left (the partial result folder is removed).
        """
        if os.path.exists(self.result_dir) and distributed.is_primary():
            shutil.rmtree(self.result_dir)
        distributed.barrier("result cleared")
        try:
            self._mark_manifests()
            with _orbax_quiet_on_disk_full(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                checkpointer.save(
                    self.result_dir,
                    args=ocp.args.Composite(params=ocp.args.StandardSave(variables),
                                            metadata=ocp.args.JsonSave(dict(metadata, weights="variables"))),
                )
            if distributed.is_primary():
                manifest.write(self.result_dir)
            distributed.barrier("result verified")
        except BaseException as e:
            if distributed.is_primary() and os.path.isdir(self.result_dir) and not manifest.has_manifest(self.result_dir):
                shutil.rmtree(self.result_dir, ignore_errors=True)
            parent = os.path.dirname(self.result_dir)
            error = self._save_failed(e, parent, "result", f"the result checkpoint '{self.result_dir}'",
                                      tree_nbytes(variables), "rerun the same command to write the result")
            if error is None:
                raise
            raise error from None

    def _check_result(self) -> None:
        if not os.path.isdir(self.result_dir):
            raise FileNotFoundError(f"no result checkpoint in '{self.result_dir}'")
        if manifest.has_manifest(self.result_dir):
            problem = manifest.verify(self.result_dir)
            if problem is not None:
                raise self._result_error(problem)
        elif self._manifests_required():
            raise self._result_error(_NO_MANIFEST)

    def _result_error(self, problem: str) -> CheckpointError:
        return CheckpointError(
            f"result checkpoint '{self.result_dir}' is corrupt: {problem}; restore that folder from a copy, "
            f"or train the run again (rerun train with --overwrite)")

    def _restore_result(self, args: dict) -> dict:
        try:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                return checkpointer.restore(self.result_dir, args=ocp.args.Composite(**args))
        except UserError:
            raise
        except Exception as e:
            raise self._result_error(f"orbax cannot restore it ({_one_line(e)})") from None

    def result_metadata(self) -> dict:
        """The result checkpoint's metadata alone (class names, number of classes, config).

        Verifies the whole result folder against its manifest first.

        Raises:
          FileNotFoundError: no result checkpoint.
          CheckpointError: the result checkpoint is corrupt.
        """
        self._check_result()
        return self._restore_result({"metadata": ocp.args.JsonRestore()})["metadata"]

    def restore_result(self, abstract_params: Any, verified: bool = False) -> tuple[Any, dict]:
        """Restores (weights, metadata) of the result checkpoint.

        Args:
          abstract_params: the abstract tree of what was saved: the variables, or for a result without
            ``"weights": "variables"`` in its metadata (:func:`result_holds_variables`) the params tree.

          verified: skip the manifest check (it was just done by :meth:`result_metadata`).

        Raises:
          FileNotFoundError: the run has no result checkpoint (it has not finished).
          CheckpointError: the result checkpoint is corrupt.
        """
        if not verified:
            self._check_result()
        restored = self._restore_result({"params": ocp.args.StandardRestore(abstract_params),
                                         "metadata": ocp.args.JsonRestore()})
        return restored["params"], restored["metadata"]

    def remove_latest(self) -> None:
        """Deletes checkpoints/latest (train.keep_checkpoints='result', once the run has finished)."""
        self.close()
        if distributed.is_primary():
            shutil.rmtree(self.latest_dir, ignore_errors=True)
        distributed.barrier("latest removed")

    def close(self) -> None:
        """Releases the checkpoint manager (call once the run is done; a second call does nothing)."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def result_holds_variables(metadata: dict) -> bool:
    """Whether a result checkpoint with this metadata holds flax variables ``{'params': ..., ...}`` (every
    result written since BatchNorm models exist) rather than the bare params tree of older runs."""
    return metadata.get("weights") == "variables"


# --------------------------------------------------------------------------- checkpoints of older versions
# Before BatchNorm models existed, the train state was (step, params, opt_state) and the best weights a bare
# params tree. Such a checkpoint restores into today's state with model_state {} and ema None (what a model
# without state and a run without EMA have), the best weights as {'params': tree}.


def _is_train_state(node: Any) -> bool:
    return dataclasses.is_dataclass(node) and hasattr(node, "model_state") and hasattr(node, "ema")


def _legacy_state(node: Any) -> Any:
    """`node` with every train state that holds no model_state and no EMA as ``{step, params, opt_state}``
    (the older layout), or None when there is none such."""
    if _is_train_state(node):
        if node.model_state or node.ema is not None:
            return None
        return {"step": node.step, "params": node.params, "opt_state": node.opt_state}
    if dataclasses.is_dataclass(node):  # e.g. the ensemble's state around its stacked members
        for field in dataclasses.fields(node):
            inner = _legacy_state(getattr(node, field.name))
            if inner is not None:
                return dataclasses.replace(node, **{field.name: inner})
    return None


def _from_legacy(abstract_state: Any, restored: Any) -> Any:
    """The restored older-layout state in today's layout (model_state {}, ema None)."""
    if _is_train_state(abstract_state):
        return abstract_state.replace(step=restored["step"], params=restored["params"],
                                      opt_state=restored["opt_state"])
    for field in dataclasses.fields(abstract_state):
        inner = getattr(abstract_state, field.name)
        if _legacy_state(inner) is not None:
            values = {f.name: getattr(restored, f.name) for f in dataclasses.fields(restored)}
            values[field.name] = _from_legacy(inner, getattr(restored, field.name))
            return dataclasses.replace(abstract_state, **values)
    return restored


def _legacy_targets(abstract_state: Any, abstract_best: Any | None) -> tuple[Any, Any] | None:
    """(older-layout abstract state, older-layout abstract best weights: the bare params tree), or None
    when the state has no older layout (a model with state, or EMA on: such runs are all new)."""
    state = _legacy_state(abstract_state)
    if state is None:
        return None
    best = abstract_best
    if isinstance(best, dict) and set(best) == {"params"}:
        best = best["params"]
    return state, best


def _best_from_legacy(abstract_best: Any | None, restored: Any | None) -> Any | None:
    if restored is None or not (isinstance(abstract_best, dict) and set(abstract_best) == {"params"}):
        return restored
    return {"params": restored}
