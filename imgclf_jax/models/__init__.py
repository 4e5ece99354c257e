"""Models by name: ``config.model.name`` picks a model family from :data:`MODELS`.

Each family registers one :class:`ModelEntry` (:mod:`imgclf_jax.models.base`): its
constructor, its layer specs, the kernels its L2 applies to, its own config keys
and its validation. The branched CNN of the reference attempts
(:mod:`imgclf_jax.models.cnn`, ``model.name='branched_cnn'``) is the default; the
residual CNNs with BatchNorm (:mod:`imgclf_jax.models.resnet`: ``'resnet'``,
``'resnet18'``, ``'resnet9'``) are the others. Everything outside this package goes through these helpers:

- :func:`create_model`: the flax module of a config's ``model`` section; it returns logits.
- :func:`layer_specs`: the analytic per-layer shapes, parameter counts and
  multiply-adds (``imgclf_jax.summary``, the fit check, FLOPs).
- :func:`l2_penalty` / :func:`regularized_kernels`: Keras's ``kernel_regularizer=l2(l)``
  term over the kernels the model's entry names (the branched CNN: conv and hidden
  dense kernels, not the output layer).
- :func:`model_entry` (by config) and :func:`entry_for` (by module): the entry itself.

A model module registers itself when imported; the imports below are what make
the package's models known (add one line for a new module in this package).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from imgclf_jax.models.base import (
    COMMON_KEYS,
    COMPUTE_DTYPES,
    DEFAULT_MODEL,
    MATMUL_PRECISIONS,
    MODELS,
    LayerSpec,
    ModelEntry,
    describe_precision,
    precision_policy,
    register,
)
from imgclf_jax.models.cnn import LOGITS, BranchedCNN  # registers 'branched_cnn'
from imgclf_jax.models.resnet import ResNet  # registers 'resnet', 'resnet18', 'resnet9'

__all__ = [
    "COMMON_KEYS",
    "COMPUTE_DTYPES",
    "DEFAULT_MODEL",
    "MATMUL_PRECISIONS",
    "LOGITS",
    "MODELS",
    "BranchedCNN",
    "LayerSpec",
    "ModelEntry",
    "ResNet",
    "create_model",
    "describe_model",
    "entry_for",
    "l2_penalty",
    "layer_specs",
    "model_entry",
    "precision_policy",
    "register",
    "regularized_kernels",
]


def model_entry(model_config: Any) -> ModelEntry:
    """The entry that ``model_config.name`` names; a section without ``name`` (a run saved before
    model.name existed) is the branched CNN's (:data:`DEFAULT_MODEL`).

    Args:
      model_config: a config's ``model`` section (a ConfigDict or a dict).

    Raises:
      ConfigError: an unknown name: ``config key 'model.name' must be one of (...), got 'x'``.
    """
    return MODELS.get(str(model_config.get("name", DEFAULT_MODEL)))


def create_model(model_config: Any, num_classes: int) -> Any:
    """The flax module of `model_config` (see :func:`model_entry`) for `num_classes` classes.

    Its ``apply(variables, images float32[B, H, W, 3], train=bool)`` returns float32[B, num_classes]
    logits. ``model.fast_path`` ('auto' when absent) is resolved by the entry for the current backend.
    """
    return model_entry(model_config).create(model_config, int(num_classes))


def layer_specs(model_config: Any, image_size: int, num_classes: int) -> list[LayerSpec]:
    """The layers of ``create_model(model_config, num_classes)`` on image_size x image_size x 3 images.

    Raises:
      ConfigError: a layer would shrink the image below one pixel (naming the key to change),
        or an unknown ``model.name``.
    """
    return model_entry(model_config).layer_specs(model_config, int(image_size), int(num_classes))


def entry_for(module: Any) -> ModelEntry:
    """The entry whose ``module_type`` is `module`'s class (else the first one it is an instance of).

    Raises:
      TypeError: `module` is no registered model's module (a programming error, not a config one).
    """
    entries = [MODELS[name] for name in MODELS]
    for entry in entries:
        if type(module) is entry.module_type:
            return entry
    for entry in entries:  # a subclass of a registered module
        if isinstance(module, entry.module_type):
            return entry
    types = ", ".join(f"{MODELS[n].module_type.__name__} ({n})" for n in MODELS)
    raise TypeError(f"{type(module).__name__} is not the module of a registered model; registered: {types}")


def regularized_kernels(params: Any, model: Any = None) -> dict[str, jax.Array]:
    """The kernels ``model.l2`` applies to, by layer name: `model`'s entry's list (default: the branched CNN's).

    Args:
      params: the model's params tree (or its variables ``{'params': ...}``).
      model: the flax module the params belong to (:func:`entry_for` finds its entry); None = the
        branched CNN (every kernel but ``logits``'s).
    """
    entry = MODELS[DEFAULT_MODEL] if model is None else entry_for(model)
    return entry.regularized_kernels(params)


def l2_penalty(params: Any, l2: float, model: Any = None) -> jax.Array:
    """Keras's L2 kernel regularization: ``l2 * sum(w**2)`` over :func:`regularized_kernels`.

    Args:
      params: the model's params tree (or its variables ``{'params': ...}``).
      l2: the factor l; a Python number (0 skips the sum) or a traced scalar.
      model: the flax module whose entry names the kernels; None = the branched CNN's
        (conv and hidden dense kernels; biases and ``logits`` not regularized).

    Returns:
      float32[] scalar, to add to the loss (0 when ``l2 == 0``).
    """
    if isinstance(l2, (int, float)) and l2 == 0:
        return jnp.zeros((), jnp.float32)
    total = sum(jnp.sum(jnp.square(k.astype(jnp.float32)))
                for k in regularized_kernels(params, model).values())
    return jnp.asarray(l2, jnp.float32) * total


def describe_model(model_config: Any) -> str:
    """The model in a few words, for the start banner: its entry's ``describe``, else its name and own keys;
    then the precision policy when it is not float32 / 'default' (:func:`describe_precision`)."""
    entry = model_entry(model_config)
    if entry.describe is not None:
        text = entry.describe(model_config)
    else:
        own = ", ".join(f"{key} {model_config[key]!r}" for key in entry.config().keys())
        text = f"'{entry.name}'" + (f" ({own})" if own else "")
    policy = describe_precision(model_config)
    return f"{text}; {policy}" if policy else text
