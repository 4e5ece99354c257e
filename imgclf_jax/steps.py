"""Pure train and eval steps, and the train state.

Batches follow :mod:`imgclf_jax.data.pipeline`: ``image: float32[B, H, W, 3]``
in [0, 1] (or ``(x - data.channel_mean) / data.channel_std`` when normalization is on),
``label: int32[B]``, ``mask: bool[B]`` (False on padding rows).

Losses follow Keras's reporting conventions (../shared/seed-attempts.md): the
loss is the configured loss (:mod:`imgclf_jax.losses`; by default the softmax
cross-entropy averaged over the real rows of the batch) plus the L2 penalty of
the kernels, in training and in evaluation alike. Metrics
are returned as sums (``loss_sum`` = loss x real rows, ``correct``, ``count``)
so an epoch's running mean is sum / count, weighting each batch by its real
rows as Keras's ``Mean`` tracker does.

Model state and weight averaging: :class:`TrainState` carries the model's
non-param variable collections (``model_state``, e.g. BatchNorm's
``{'batch_stats': ...}``; ``{}`` for a model without any, such as the branched
CNN, whose steps are then exactly what they were) and, when ``train.ema_decay``
is on, an exponential moving average of the weights (``ema``). Everything that
evaluates weights takes flax *variables* ``{'params': ..., 'batch_stats': ...}``
(:func:`eval_variables` gives a state's: the EMA's when on); a bare params tree is
accepted as ``{'params': tree}`` (:func:`imgclf_jax.models.base.as_variables`).

Recipe hooks (:func:`recipe_hooks` builds them from a config; None = off, the
default, which gives bit-identical results to a step without them):
``loss_fn`` (:mod:`imgclf_jax.losses`), ``batch_transform`` in the train step
(:mod:`imgclf_jax.batch_transforms`) and ``eval_transform`` in the eval step
(:mod:`imgclf_jax.eval_transforms`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from imgclf_jax import batch_transforms, eval_transforms, losses, parallel
from imgclf_jax.models import entry_for, l2_penalty
from imgclf_jax.models.base import as_variables


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    step: int32[] optimizer updates so far (the learning-rate schedule's step).
    params: the model's parameter pytree.
    opt_state: the optimizer's state pytree.
    model_state: the model's other variable collections, ``{collection: tree}`` (BatchNorm's running
      statistics: ``{'batch_stats': ...}``); ``{}`` for a model without any. Updated by every train step.
    ema: None when ``train.ema_decay`` is off; else the exponential moving average of the variables
      ``{'params': ..., **model_state}`` (:func:`ema_update`), the weights evaluation uses.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)
    ema: Any = None


def init_variables(model: nn.Module, key: jax.Array, image_size: int) -> dict:
    """All variable collections for ``float32[1, image_size, image_size, 3]`` inputs: ``{'params': ...,
    **model_state}`` (the branched CNN: ``{'params': ...}`` only)."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return dict(model.init({"params": key}, dummy, train=False))


def init_params(model: nn.Module, key: jax.Array, image_size: int) -> Any:
    """Initializes params for ``float32[1, image_size, image_size, 3]`` inputs."""
    return init_variables(model, key, image_size)["params"]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_size: int, ema_decay: float = 0.0) -> TrainState:
    """A fresh state: variables from `key` (the model's initializers), optimizer state from `tx`, step 0;
    with ``ema_decay > 0`` the EMA starts at the initial variables."""
    variables = init_variables(model, key, image_size)
    params = variables.pop("params")
    ema = {"params": params, **variables} if ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=variables, ema=ema)


def eval_variables(state: TrainState) -> dict:
    """The variables that evaluation, early stopping's best weights and the result checkpoint use: the EMA
    when on, else ``{'params': state.params, **state.model_state}`` (leaves may be stacked per member)."""
    if state.ema is not None:
        return state.ema
    return {"params": state.params, **state.model_state}


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The EMA decay used after update number `step` (1-based: updates done, including this one):
    ``min(decay, (1 + step) / (10 + step))``, TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``
    warm-up, so the average is not dominated by the random initialization in short runs."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, variables: Any, decay: float, step: jax.Array) -> Any:
    """One EMA update: ``ema <- d * ema + (1 - d) * variables`` leafwise, d = :func:`ema_decay_at`
    (`step`: updates done including the one that produced `variables`). Source: Polyak & Juditsky (1992)
    averaging in its exponential form, as ``tf.train.ExponentialMovingAverage``; the BatchNorm statistics are
    averaged too (timm's ``ModelEmaV2``), so the averaged weights come with matching statistics."""
    d = ema_decay_at(decay, step)
    return jax.tree.map(lambda e, v: (d * e + (1.0 - d) * v).astype(e.dtype), ema, variables)


def _model_kwargs(model: nn.Module, batch: dict, model_state: dict) -> dict:
    """``{'mask': batch['mask']}`` for a model whose entry takes the mask (BatchNorm statistics over real rows).

    Raises:
      ValueError: the model has variable collections besides params (`model_state`, e.g. BatchNorm
        statistics) but its entry does not take the mask: the padded rows of a last batch would enter them.
    """
    entry = entry_for(model)
    if model_state and not entry.takes_mask:
        raise ValueError(f"model '{entry.name}' keeps {sorted(model_state)} but its ModelEntry does not set "
                         "takes_mask: its padded rows would enter those statistics; take mask= and set "
                         "takes_mask=True")
    return {"mask": batch["mask"]} if entry.takes_mask else {}


def _loss_and_metrics(logits, batch, penalty, loss_fn):
    ce = loss_fn(logits, batch)
    loss = ce + penalty
    mask = batch["mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * mask)
    return loss, {"loss_sum": loss * count, "correct": correct, "count": count}


def train_step(state: TrainState, batch: dict, key: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, l2: float, loss_fn: losses.LossFn | None = None,
               batch_transform: batch_transforms.BatchTransformFn | None = None,
               ema_decay: float = 0.0) -> tuple[TrainState, dict]:
    """One optimizer update on one batch.

    Args:
      state: the train state.
      batch: a pipeline batch (see module docstring).
      key: the run's dropout key; this step's dropout uses ``fold_in(key, state.step)``.
      model, tx, l2: the model, the optimizer and the L2 factor (static).
      loss_fn: ``loss(logits, batch) -> float32[]``; None = :data:`imgclf_jax.losses.DEFAULT`.
      batch_transform: ``fn(batch, key) -> batch`` applied before the forward pass with key
        :func:`imgclf_jax.batch_transforms.transform_key` of this step's dropout key (which is
        itself unchanged); None = off.
      ema_decay: the EMA decay (static); 0 = off. It must agree with the state (``state.ema`` None
        exactly when 0, as :func:`create_train_state` makes it).

    The model runs in training mode: dropout on, and a model with ``model_state`` (BatchNorm) computes
    batch statistics (over the rows where ``mask`` is True, for a model whose entry ``takes_mask``) and
    returns its new running statistics, which the new state carries.

    Returns:
      (new state, metrics with float32 sums ``loss_sum``, ``correct``, ``count``). ``correct`` counts
      rows whose argmax is the row's own label, also when a batch transform mixed the images (so train
      accuracy under MixUp/CutMix is not comparable with a run without them; validation is).

    Raises:
      ValueError: `ema_decay` and ``state.ema`` disagree, or a model with ``model_state`` whose entry
        does not take the mask (:func:`_model_kwargs`); both at trace time.
    """
    loss_fn = losses.LOSSES[losses.DEFAULT].fn if loss_fn is None else loss_fn
    dropout_key = jax.random.fold_in(key, state.step)
    if batch_transform is not None:
        batch = batch_transform(batch, batch_transforms.transform_key(dropout_key))

    kwargs = _model_kwargs(model, batch, state.model_state)
    if (ema_decay > 0) != (state.ema is not None):
        raise ValueError(f"train_step: ema_decay={ema_decay} but the state's ema is "
                         f"{'None' if state.ema is None else 'set'}: create the state with the same ema_decay")

    def objective(params):
        if state.model_state:
            logits, model_state = model.apply({"params": params, **state.model_state}, batch["image"],
                                              train=True, rngs={"dropout": dropout_key},
                                              mutable=list(state.model_state), **kwargs)
        else:  # exactly the stateless step (the reference configs' models)
            logits = model.apply({"params": params}, batch["image"], train=True,
                                 rngs={"dropout": dropout_key}, **kwargs)
            model_state = {}
        loss, metrics = _loss_and_metrics(logits, batch, l2_penalty(params, l2, model=model), loss_fn)
        return loss, (metrics, dict(model_state))

    grads, (metrics, model_state) = jax.grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema = None
    if ema_decay > 0:
        ema = ema_update(state.ema, {"params": params, **model_state}, ema_decay, step)
    return TrainState(step=step, params=params, opt_state=opt_state, model_state=model_state, ema=ema), metrics


def eval_step(weights: Any, batch: dict, *, model: nn.Module, l2: float, loss_fn: losses.LossFn | None = None,
              eval_transform: eval_transforms.EvalTransformFn | None = None) -> tuple[dict, jax.Array]:
    """Evaluates one batch (dropout off, BatchNorm on its running statistics).

    Args:
      weights: the model's variables ``{'params': ..., **model_state}`` (:func:`eval_variables`), or a
        bare params tree for a model without state (:func:`as_variables`).
      loss_fn: as in :func:`train_step`.
      eval_transform: ``fn(apply_logits, images) -> logits`` wrapping the forward pass (e.g.
        test-time augmentation); None = off.

    Returns:
      (metrics as in :func:`train_step`, ``float32[B, num_classes]`` softmax probabilities).
    """
    loss_fn = losses.LOSSES[losses.DEFAULT].fn if loss_fn is None else loss_fn
    variables = as_variables(weights)

    def apply_logits(images):
        return model.apply(variables, images, train=False)

    if eval_transform is None:
        logits = apply_logits(batch["image"])
    else:
        logits = eval_transform(apply_logits, batch["image"])
    _, metrics = _loss_and_metrics(logits, batch, l2_penalty(variables["params"], l2, model=model), loss_fn)
    return metrics, jax.nn.softmax(logits, axis=-1)


def jit_train_step(model, tx, l2: float, mesh, *, loss_fn=None, batch_transform=None,
                   ema_decay: float = 0.0) -> Callable:
    """``train_step`` jit-compiled over `mesh`: state replicated and donated, batch split on B.

    `loss_fn`, `batch_transform` and `ema_decay` as in :func:`train_step` (None/0 = the default loss, no
    transform, no EMA). BatchNorm statistics are over the global batch: the step is one program over the
    whole sharded batch, so its batch means are means over every device's rows (XLA adds the reduction).
    """
    rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(state, batch, key):
        return train_step(state, batch, key, model=model, tx=tx, l2=l2, loss_fn=loss_fn,
                          batch_transform=batch_transform, ema_decay=ema_decay)

    return jax.jit(step, in_shardings=(rep, split, rep), out_shardings=(rep, rep), donate_argnums=(0,))


def jit_eval_step(model, l2: float, mesh, *, loss_fn=None, eval_transform=None) -> Callable:
    """``eval_step`` jit-compiled over `mesh`: params replicated, batch and probabilities split on B.

    `loss_fn` and `eval_transform` as in :func:`eval_step` (None = the default loss, no transform).
    """
    rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def step(weights, batch):
        return eval_step(weights, batch, model=model, l2=l2, loss_fn=loss_fn, eval_transform=eval_transform)

    return jax.jit(step, in_shardings=(rep, split), out_shardings=(rep, split))


def eval_hooks(config: Any) -> tuple[losses.LossFn, eval_transforms.EvalTransformFn | None]:
    """(loss_fn, eval_transform) of a run's config: what evaluating its weights needs (predict).

    Reads ``loss.name``, the chosen loss's keys (e.g. ``loss.label_smoothing``, bound:
    ``functools.partial(entry.fn, label_smoothing=...)``), ``train.eval_transform`` and the ``tta``
    keys it declares (bound into the returned function, :func:`imgclf_jax.eval_transforms.from_config`);
    a key absent (the config.json of a run made before these keys existed) counts as its default
    ('softmax_cross_entropy', label smoothing 0, '' = off = None, the ``tta`` defaults).

    Raises:
      ConfigError: an unknown name.
    """
    loss = config.get("loss") or {}
    entry = losses.LOSSES.get(loss.get("name", losses.DEFAULT))
    return _bound(entry.fn, entry.keys, loss), eval_transforms.from_config(config)


def _bound(fn: Callable, keys: Any, section: Any, **extra: Any) -> Callable:
    """`fn` with its entry's `keys` bound to `section`'s values (a key absent there: its default) and
    `extra`; `fn` itself when there is nothing to bind."""
    settings = {key: section.get(key, default) for key, default in keys.items()}
    settings.update(extra)
    return functools.partial(fn, **settings) if settings else fn


def recipe_hooks(config: Any, num_classes: int | None = None
                 ) -> tuple[losses.LossFn, batch_transforms.BatchTransformFn | None,
                            eval_transforms.EvalTransformFn | None]:
    """(loss_fn, batch_transform, eval_transform) of a run's config, for the step functions above.

    Reads ``loss.name`` (and its keys), ``train.batch_transform`` (and its ``mixing.*`` keys) and
    ``train.eval_transform`` (absent keys count as their defaults, see :func:`eval_hooks`); off is
    returned as None. The batch transform comes bound to the run's `num_classes` and its entry's
    settings (``functools.partial(fn, num_classes=..., alpha=..., probability=...)``), so the step
    calls ``fn(batch, key)`` and soft targets have the right width.

    Raises:
      ConfigError: an unknown name, or a loss that cannot take the soft targets the chosen
        batch transform makes (:func:`imgclf_jax.losses.check_targets`).
      ValueError: a batch transform is chosen and `num_classes` is not given.
    """
    loss_fn, eval_transform = eval_hooks(config)
    loss_name = (config.get("loss") or {}).get("name", losses.DEFAULT)
    transform_name = (config.get("train") or {}).get("batch_transform", "")
    transform = batch_transforms.BATCH_TRANSFORMS.get(transform_name)
    losses.check_targets(loss_name, transform is not None and transform.makes_targets, transform_name)
    if transform is None:
        return loss_fn, None, eval_transform
    if num_classes is None:
        raise ValueError(f"recipe_hooks needs num_classes for train.batch_transform={transform_name!r}")
    mixing = config.get(batch_transforms.SECTION) or {}
    return loss_fn, _bound(transform.fn, transform.keys, mixing, num_classes=int(num_classes)), eval_transform
