"""orbax checkpoints of a run: the latest state (for resuming) and the result (for predicting).

Layout in the workdir::

  checkpoints/latest/<updates done>/   state (step, params, opt_state), best params when early
                                      stopping restores them, and JSON loop state (history,
                                      early stopping); one kept
  checkpoints/result/                 the result params and JSON metadata (class names, ...)

Restoring takes an abstract target (``jax.ShapeDtypeStruct`` leaves carrying the
current shardings), so a checkpoint written with one device count restores
with another. Saves are synchronous: once ``save_*`` returns, the checkpoint is
complete on disk (orbax writes to a temporary folder and renames it).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any, sharding) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of `tree`'s shapes and dtypes, placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class RunCheckpoints:
    """The checkpoints of one workdir."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self._latest = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints", "latest"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
        )

    @property
    def result_dir(self) -> str:
        """``<workdir>/checkpoints/result``: the result params and metadata."""
        return os.path.join(self.workdir, "checkpoints", "result")

    def latest_step(self) -> int | None:
        """Optimizer updates done in the latest checkpoint, or None if there is none."""
        return self._latest.latest_step()

    def save_latest(self, step: int, state: Any, best_params: Any | None, loop_state: dict) -> None:
        """Saves the state after `step` updates, replacing the previous checkpoint."""
        items = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop_state)}
        if best_params is not None:
            items["best_params"] = ocp.args.StandardSave(best_params)
        self._latest.save(step, args=ocp.args.Composite(**items), force=True)
        self._latest.wait_until_finished()

    def restore_latest(self, abstract_state: Any, abstract_best: Any | None) -> tuple[Any, Any, dict]:
        """Restores (state, best params or None, loop state) of the latest checkpoint."""
        step = self._latest.latest_step()
        items = {"state": ocp.args.StandardRestore(abstract_state), "loop": ocp.args.JsonRestore()}
        if abstract_best is not None:
            items["best_params"] = ocp.args.StandardRestore(abstract_best)
        restored = self._latest.restore(step, args=ocp.args.Composite(**items))
        best = restored["best_params"] if abstract_best is not None else None
        return restored["state"], best, restored["loop"]

    def save_result(self, params: Any, metadata: dict) -> None:
        """Writes the result params and metadata, replacing an earlier result."""
        if os.path.exists(self.result_dir):
            shutil.rmtree(self.result_dir)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(
                self.result_dir,
                args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                        metadata=ocp.args.JsonSave(metadata)),
            )

    def result_metadata(self) -> dict:
        """The result checkpoint's metadata alone (class names, number of classes, config)."""
        if not os.path.isdir(self.result_dir):
            raise FileNotFoundError(f"no result checkpoint in '{self.result_dir}'")
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                self.result_dir, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return restored["metadata"]

    def restore_result(self, abstract_params: Any) -> tuple[Any, dict]:
        """Restores (params, metadata) of the result checkpoint.

        Raises:
          FileNotFoundError: the run has no result checkpoint (it has not finished).
        """
        if not os.path.isdir(self.result_dir):
            raise FileNotFoundError(f"no result checkpoint in '{self.result_dir}'")
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                self.result_dir,
                args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                        metadata=ocp.args.JsonRestore()),
            )
        return restored["params"], restored["metadata"]

    def close(self) -> None:
        """Releases the checkpoint manager (call once the run is done)."""
        self._latest.close()
