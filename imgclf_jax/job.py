"""What a training job provides to the one training driver (:func:`imgclf_jax.driver.train`).

A job is the part of a run that differs between a plain run
(:class:`imgclf_jax.plain.PlainJob`) and a K-member ensemble
(:class:`imgclf_jax.ensemble.job.EnsembleJob`): how its state is made and
restored, its compiled step, how a step's metrics are summed, what happens at
the end of an epoch (validation, early stopping, the history entry) and at the
end of the run (result weights, reports, summary). The driver owns everything
they share: resume, the epoch loop, checkpoint saves, interrupt exits and
history writes.

The device state (a pytree the step donates) passes through the driver; a job
keeps the host-side bookkeeping (early stopping, best weights, NaN reports).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from imgclf_jax.data import splits


def count_params(params) -> int:
    """Total number of scalars in a params pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclasses.dataclass
class RunParts:
    """What :func:`imgclf_jax.loop.prepare_run` builds for a job from the config.

    data: the run's splits; model: the flax module (logits); tx, schedule: the optimizer and its
    learning-rate schedule (``schedule(step) -> float32[]``, step = updates so far); mesh: the
    device mesh; memory: the figures of :func:`imgclf_jax.memory.check_fits`; loss_fn,
    batch_transform, eval_transform: the recipe's hooks for the steps (:func:`imgclf_jax.steps.recipe_hooks`;
    None = off).
    """

    data: splits.RunData
    model: Any
    tx: optax.GradientTransformation
    schedule: Callable
    mesh: jax.sharding.Mesh
    memory: dict
    loss_fn: Callable
    batch_transform: Callable | None
    eval_transform: Callable | None


class Job(abc.ABC):
    """The job interface the driver calls, in this order (see :func:`imgclf_jax.driver.train`).

    Attributes set by subclasses:
      config, workdir, parts: the run's config, workdir and :class:`RunParts`.
      train: the training pipeline (``steps_per_epoch``, ``epoch_size``, ``batches(start, stop)``).
      keeps_best: whether the result weights are the best epoch's (early stopping restores them).
    """

    config: ml_collections.ConfigDict
    workdir: str
    parts: RunParts
    train: Any
    keeps_best: bool

    def describe(self) -> str | None:
        """A line printed before resuming (e.g. the ensemble's members), or None."""
        return None

    @abc.abstractmethod
    def init_state(self) -> Any:
        """A fresh device state (replicated) and fresh host bookkeeping."""

    @abc.abstractmethod
    def abstract_state(self) -> tuple[Any, Any | None]:
        """(abstract state, abstract best params or None) with shardings, for checkpoint restore."""

    @abc.abstractmethod
    def restore(self, state: Any, best_params: Any | None, stopping: dict) -> None:
        """Takes back the host bookkeeping saved by :meth:`stopping_state` and the best params."""

    @abc.abstractmethod
    def empty_totals(self) -> dict:
        """The running sums of an epoch that has not started (``Progress.totals``)."""

    @abc.abstractmethod
    def num_params(self, state: Any) -> int:
        """Parameters of one model (one member)."""

    @abc.abstractmethod
    def stopped(self) -> bool:
        """Whether training is over before the epochs run out (early stopping, every member frozen)."""

    def start_epoch(self) -> None:
        """Called before each epoch's first step (also when resuming mid-epoch)."""

    @abc.abstractmethod
    def step(self, state: Any, batch: dict) -> tuple[Any, Any]:
        """One compiled update on a host batch: ``(state, device metrics)``."""

    @abc.abstractmethod
    def accumulate(self, progress, metrics: Any, global_step: int, batch_index: int) -> dict:
        """Adds one step's device metrics to ``progress.totals`` (may raise to stop the run);
        returns the progress bar's fields."""

    @abc.abstractmethod
    def end_epoch(self, state: Any, progress) -> tuple[Any, dict]:
        """Validation, early stopping and best weights after epoch ``progress.epoch``;
        returns (state, history entry without ``seconds``, which the driver adds last)."""

    @abc.abstractmethod
    def epoch_line(self, entry: dict) -> str:
        """The epoch's printed line (the driver appends the ETA)."""

    @abc.abstractmethod
    def checkpoint_position(self, state: Any, progress) -> int:
        """The number of the checkpoint to save now (grows with every save)."""

    @abc.abstractmethod
    def stopping_state(self) -> dict:
        """The JSON-serializable host bookkeeping saved with each checkpoint (``Progress.early_stopping``)."""

    @abc.abstractmethod
    def best_params(self) -> Any | None:
        """The best weights to checkpoint beside the state (None when not kept)."""

    @abc.abstractmethod
    def finish(self, state: Any, progress, checkpoints) -> dict:
        """Saves the result checkpoint, writes the reports and summary.json; returns the summary."""

    def check_result(self, summary: dict) -> None:
        """Called last, after the checkpoints are tidied: may raise (e.g. every member diverged)."""
