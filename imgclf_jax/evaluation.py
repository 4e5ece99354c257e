"""Evaluation of weights over a split: mean loss, top-1 accuracy and class probabilities.

Used by the training jobs (validation after each epoch, the result weights, the
test split) and by ``predict``, which needs no part of training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from imgclf_jax import distributed, parallel
from imgclf_jax import progress as progress_lib
from imgclf_jax.data import pipeline, splits


@dataclasses.dataclass
class Evaluation:
    """Results over one split: mean loss, accuracy and probabilities float32[N, C].

    For an ensemble's eval step (a leading member axis K): loss and accuracy are
    float64[K] and probabilities float32[K, N, C].
    """

    loss: float | np.ndarray
    accuracy: float | np.ndarray
    probabilities: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        """int64[N] (or [K, N]) predicted classes (argmax of the probabilities)."""
        return np.argmax(self.probabilities, axis=-1)


def evaluate(eval_step, params, split: splits.Split, config, mesh, desc: str = "evaluate") -> Evaluation:
    """Runs `eval_step` over every row of `split` (in order, padded batches masked out).

    `eval_step(params, batch)` returns (metric sums, probabilities ``[..., B, C]``);
    a leading member axis, if any, is kept in the result. Progress (images, images/s)
    goes to stderr as a :class:`imgclf_jax.progress.Bar` named `desc`.

    In a multi-process run each process loads its block of every batch; the metric sums are global
    and the probabilities are gathered, so every process returns the same whole-split result.
    """
    totals = None
    probabilities = []
    bar = progress_lib.Bar(len(split), desc)
    batch_size, shard = config.train.batch_size, distributed.share()
    try:
        for j, batch in enumerate(pipeline.iterate(pipeline.eval_dataset(split, config, shard=shard),
                                                   config.data.num_workers)):
            metrics, probs = eval_step(params, parallel.shard_batch(batch, mesh))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
            mask = np.arange(j * batch_size, (j + 1) * batch_size) < len(split)  # the global batch's real rows
            if shard[1] > 1:  # every process gets every row's probabilities
                probs = multihost_utils.process_allgather(probs, tiled=True)
            probabilities.append(np.asarray(probs)[..., mask, :])
            bar.update(int(mask.sum()))
    finally:
        bar.close()
    totals = {k: np.asarray(v, np.float64) for k, v in jax.device_get(totals).items()}
    count = np.maximum(totals["count"], 1.0)
    loss, accuracy = totals["loss_sum"] / count, totals["correct"] / count
    if loss.ndim == 0:
        loss, accuracy = float(loss), float(accuracy)
    return Evaluation(loss=loss, accuracy=accuracy, probabilities=np.concatenate(probabilities, axis=-2))



def labelled_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float | None:
    """Top-1 accuracy of `predictions` (int[N]) against `labels` (int64[N]); None when the split is
    unlabeled (any label -1)."""
    labels = np.asarray(labels)
    if len(labels) == 0 or (labels < 0).any():
        return None
    return float(np.mean(np.asarray(predictions) == labels))
