"""What every model family provides, and the table that names them: :class:`ModelEntry`, :data:`MODELS`.

A model family is one module that registers one :class:`ModelEntry` in
:data:`MODELS` under the name ``config.model.name`` selects (``'branched_cnn'``,
:mod:`imgclf_jax.models.cnn`, is the default). The entry is the whole contract
between a model and the rest of the package: the training loop, ``summary``,
the fit check, the memory estimate, the L2 term and the config schema all go
through it (by way of the helpers in :mod:`imgclf_jax.models`), never through a
model class.

This module imports no model, so a model module may import it without importing
the package that imports the model modules (no import cycle).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from imgclf_jax.errors import ConfigError
from imgclf_jax.registry import Registry

DEFAULT_MODEL = "branched_cnn"  # model.name when a config (an old config.json) has none

# The keys every model section has, besides the model's own (their defaults are in imgclf_jax.config).
COMMON_KEYS = ("name", "l2", "fast_path", "compute_dtype", "matmul_precision")

# model.compute_dtype: the dtype of the layers' computation (activations, conv and matmul inputs). The
# params, their gradients and the optimizer state stay float32 whatever it says (mixed precision:
# Micikevicius et al. 2018, "Mixed Precision Training"; bfloat16 needs no loss scaling, its exponent
# range being float32's), BatchNorm's statistics are reduced in float32, and the logits are float32.
COMPUTE_DTYPES = ("float32", "bfloat16")
# model.matmul_precision: jax.lax.Precision of the convs and dense layers (jax's documentation of
# lax.Precision): 'default' lets the backend choose (XLA:CPU computes float32 in full float32; on an
# NVIDIA GPU with tensor cores, A100 / H100 / H200, float32 convs and matmuls run in TensorFloat-32, a
# 10-bit mantissa); 'highest' asks for full float32 on every backend (slower on a GPU).
MATMUL_PRECISIONS = ("default", "highest")

MODELS = Registry("model.name")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a model, computed analytically from the config (any model family's rows).

    Attributes:
      name: the param-tree name for layers with parameters (``conv_0``, ``logits``),
        else a descriptive one (``pool_0``, ``flatten``).
      kind: what the layer does, e.g. 'conv', 'max_pool', 'dropout', 'flatten', 'avg_pool',
        'concat', 'batch_norm', 'add', 'global_avg_pool' or 'dense'.
      output_shape: per-image output shape, (H, W, C) or (N,).
      params: number of parameters (kernel + bias; BatchNorm scale + bias, its running mean and
        variance being state, not params); the rows' params per ``name`` must equal the real
        module's (``summary`` checks it). A layer inside a submodule is named by its path,
        ``block/conv1``.
      macs: multiply-accumulates per image (convs and dense layers; 0 otherwise); FLOPs = 2 x macs.
      branch: the part of the model the layer belongs to, e.g. 'main', 'side' or 'head'.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    branch: str


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model family: everything the package needs from it, as functions of the ``model`` config section.

    Attributes:
      name: the ``model.name`` that selects it.
      module_type: the flax module class that :attr:`create` returns (how :func:`imgclf_jax.models.entry_for`
        finds the entry of a module).
      config: ``() -> ml_collections.ConfigDict`` of the model's own keys with their defaults (flat, one
        level; not the common keys :data:`COMMON_KEYS`).
      validate: ``(model_config, image_size) -> None``; raises ConfigError naming the key
        (``config key 'model.K' must be ..., got V``) for an impossible value.
      create: ``(model_config, num_classes) -> flax module`` whose ``apply(variables, images
        float32[B, H, W, 3], train=bool, rngs={'dropout': key})`` returns float32[B, num_classes] logits.
        It follows :func:`precision_policy` (its layers' ``dtype`` and ``precision``; params float32).
        A model with state besides its params (BatchNorm's ``batch_stats``) has it in the variables
        ``model.init`` returns, and in training is applied with ``mutable=[those collections]``.
      takes_mask: the module's ``__call__`` takes ``mask=bool[B] | None`` (the batch's real rows; None =
        all): a BatchNorm model computes its training statistics over those rows only, so padding rows
        never enter them. The train step passes ``mask=batch['mask']`` only when this is True (the
        branched CNN: False; the ResNets: True).
      precision_policy: :attr:`create` follows ``model.compute_dtype`` and ``model.matmul_precision``
        (:func:`precision_policy`). False (a model registered before the policy existed, or one that
        does not read them): config.validate refuses any value but 'float32' and 'default', so a
        bfloat16 setting is never recorded and silently ignored.
      layer_specs: ``(model_config, image_size, num_classes) -> list[LayerSpec]``, the layers of the
        module on image_size x image_size x 3 images; raises ConfigError when the image is too small.
      regularized_kernels: ``(params) -> {layer name: kernel}``, the kernels ``model.l2`` applies to
        (params: the params tree or the variables ``{'params': ...}``, see :func:`params_dict`).
      describe: ``(model_config) -> str``, the model in a few words for the start banner; None: the
        model's name and its own keys with their values.
      size_keys: the model's keys that set its size, named when the memory check asks for a smaller
        model (e.g. ``('conv_filters', 'dense_units')``).
    """

    name: str
    module_type: type
    config: Callable[[], Any]
    validate: Callable[[Any, int], None]
    create: Callable[[Any, int], Any]
    layer_specs: Callable[[Any, int, int], list[LayerSpec]]
    regularized_kernels: Callable[[Any], dict]
    size_keys: tuple[str, ...] = ()
    describe: Callable[[Any], str] | None = None
    takes_mask: bool = False
    precision_policy: bool = False


def register(entry: ModelEntry) -> ModelEntry:
    """Adds `entry` to :data:`MODELS` under ``entry.name``; returns it. ValueError if the name is taken."""
    return MODELS.register(entry.name, entry)


def as_variables(weights: Any) -> dict:
    """Flax variables of `weights`: a variables dict ``{'params': ..., ...}`` (e.g. with ``batch_stats``) as
    it is, a bare params tree (what the result checkpoints of stateless models held before variables
    existed, and what the steps' callers passed before) as ``{'params': weights}``."""
    if hasattr(weights, "keys") and "params" in weights.keys():
        return dict(weights)
    return {"params": weights}


def params_dict(params: Any) -> Any:
    """The params tree of `params`: the variables ``{'params': {...}, ...}`` (other collections, e.g.
    ``batch_stats``, ignored) or the params tree itself (:func:`as_variables`)."""
    return as_variables(params)["params"]


def precision_policy(model_config: Any) -> tuple[Any, Any]:
    """(dtype, precision) for the model's flax layers, from ``model.compute_dtype`` and ``model.matmul_precision``.

    dtype is ``jnp.float32`` or ``jnp.bfloat16`` (the layers' ``dtype=``; their ``param_dtype`` stays
    float32); precision is None ('default': the backend's choice) or ``jax.lax.Precision.HIGHEST``.
    A section without the keys (a run saved before they existed) gets float32 and 'default'.
    """
    import jax
    import jax.numpy as jnp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[str(model_config.get("compute_dtype", "float32"))]
    precision = {"default": None, "highest": jax.lax.Precision.HIGHEST}[
        str(model_config.get("matmul_precision", "default"))]
    return dtype, precision


def describe_precision(model_config: Any) -> str:
    """The policy in a few words for the banner, '' at the defaults (float32, 'default')."""
    words = []
    if model_config.get("compute_dtype", "float32") != "float32":
        words.append(f"compute {model_config.compute_dtype} (params float32)")
    if model_config.get("matmul_precision", "default") != "default":
        words.append(f"matmul precision '{model_config.matmul_precision}'")
    return ", ".join(words)


def require(ok: bool, model_config: Any, key: str, what: str) -> None:
    """For a model's validate: raises ``ConfigError("config key 'model.KEY' must be WHAT, got VALUE")`` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key 'model.{key}' must be {what}, got {model_config[key]!r}")
