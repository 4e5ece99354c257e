"""Pure train and eval steps, and the train state.

Batches follow :mod:`imgclf_jax.data.pipeline`: ``image: float32[B, H, W, 3]``
in [0, 1], ``label: int32[B]``, ``mask: bool[B]`` (False on padding rows).

Losses follow Keras's reporting conventions (../shared/seed-attempts.md): the
loss is the softmax cross-entropy averaged over the real rows of the batch plus
the L2 penalty of the kernels, in training and in evaluation alike. Metrics
are returned as sums (``loss_sum`` = loss x real rows, ``correct``, ``count``)
so an epoch's running mean is sum / count, weighting each batch by its real
rows as Keras's ``Mean`` tracker does.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from imgclf_jax import parallel
from imgclf_jax.models import l2_penalty
from imgclf_jax.optim import softmax_cross_entropy


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    step: int32[] optimizer updates so far (the learning-rate schedule's step).
    params: the model's parameter pytree.
    opt_state: the optimizer's state pytree.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def init_params(model: nn.Module, key: jax.Array, image_size: int) -> Any:
    """Initializes params for ``float32[1, image_size, image_size, 3]`` inputs."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init({"params": key}, dummy, train=False)["params"]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_size: int) -> TrainState:
    """A fresh state: params from `key` (Keras initializers), optimizer state from `tx`, step 0."""
    params = init_params(model, key, image_size)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _loss_and_metrics(logits, batch, penalty):
    ce = softmax_cross_entropy(logits, batch["label"], batch["mask"])
    loss = ce + penalty
    mask = batch["mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * mask)
    return loss, {"loss_sum": loss * count, "correct": correct, "count": count}


def train_step(state: TrainState, batch: dict, key: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, l2: float) -> tuple[TrainState, dict]:
    """One optimizer update on one batch.

    Args:
      state: the train state.
      batch: a pipeline batch (see module docstring).
      key: the run's dropout key; this step's dropout uses ``fold_in(key, state.step)``.
      model, tx, l2: the model, the optimizer and the L2 factor (static).

    Returns:
      (new state, metrics with float32 sums ``loss_sum``, ``correct``, ``count``).
    """
    dropout_key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["image"], train=True,
                             rngs={"dropout": dropout_key})
        return _loss_and_metrics(logits, batch, l2_penalty(params, l2, model=model))

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict, *, model: nn.Module, l2: float) -> tuple[dict, jax.Array]:
    """Evaluates one batch (dropout off).

    Returns:
      (metrics as in :func:`train_step`, ``float32[B, num_classes]`` softmax probabilities).
    """
    logits = model.apply({"params": params}, batch["image"], train=False)
    _, metrics = _loss_and_metrics(logits, batch, l2_penalty(params, l2, model=model))
    return metrics, jax.nn.softmax(logits, axis=-1)


def jit_train_step(model, tx, l2: float, mesh) -> Callable:
    """``train_step`` jit-compiled over `mesh`: state replicated and donated, batch split on B."""
    rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(state, batch, key):
        return train_step(state, batch, key, model=model, tx=tx, l2=l2)

    return jax.jit(step, in_shardings=(rep, split, rep), out_shardings=(rep, rep), donate_argnums=(0,))


def jit_eval_step(model, l2: float, mesh) -> Callable:
    """``eval_step`` jit-compiled over `mesh`: params replicated, batch and probabilities split on B."""
    rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(params, batch):
        return eval_step(params, batch, model=model, l2=l2)

    return jax.jit(step, in_shardings=(rep, split), out_shardings=(rep, split))
