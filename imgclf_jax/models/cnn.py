"""The branched CNN of the reference attempts, as one configurable Flax linen module.

Source: ``../shared/seed-attempts.md`` (attempts 1, 2, 4, 5 and 6; configs
``configs/ml1.py`` ... ``ml6.py``). Every Keras model there is an instance of
one shape:

- main branch, per conv layer ``i``: ``Conv(conv_filters[i], k x k, stride 1,
  padding 'same'|'valid')`` -> ReLU -> [MaxPool 2x2 stride 2, 'valid'] ->
  [Dropout(conv_dropouts[i])]; then Flatten (row-major H, W, C, as Keras's
  ``Flatten`` on channels-last data);
- optional side branch from the input (``side_filters > 0``):
  ``Conv(side_filters, side_kernel_size, 'same')`` -> ReLU ->
  ``AveragePool(side_pool_size, stride side_pool_size, 'valid')`` -> Flatten,
  concatenated after the main branch: ``[main, side]``;
- head: per ``dense_units[i]``: Dense -> ReLU -> [Dropout(dense_dropouts[i])];
  then ``Dense(num_classes)`` named ``logits``. The module returns logits: the
  Keras models' final softmax lives in the loss
  (:func:`imgclf_jax.losses.softmax_cross_entropy`).

Keras semantics kept: kernels start glorot-uniform and biases zero (Keras's
defaults; Flax's are lecun-normal); ``'SAME'``/``'VALID'`` padding is XLA's, which
is TensorFlow's; dropout is inverted (scaled by 1 / (1 - rate)) and active only
with ``train=True``. For conv kernels (HWIO) glorot's fans include the receptive
field, fan_in = k*k*C_in and fan_out = k*k*C_out, exactly as Keras computes them
(``jax.nn.initializers.variance_scaling`` with in_axis=-2, out_axis=-1 treats the
other axes as the receptive field), so the limit is sqrt(6 / (fan_in + fan_out)).

Layer names are stable: ``conv_0``, ``conv_1``, ..., ``side_conv``, ``dense_0``,
..., ``logits``. L2 (:func:`regularized_kernels`) applies to every kernel but ``logits``'s.

Registered as ``model.name='branched_cnn'`` (:data:`ENTRY`, the default model): its own
config keys are :func:`config`'s, checked by :func:`validate`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import imgclf_jax.models.fast_path as fast_path_lib
from imgclf_jax import backend
from imgclf_jax.errors import ConfigError
from imgclf_jax.models.base import LayerSpec, ModelEntry, params_dict, precision_policy, register, require

LOGITS = "logits"  # the output layer's name; the one kernel without L2
PADDINGS = ("same", "valid")  # model.conv_paddings

_KERNEL_INIT = nn.initializers.glorot_uniform()  # Keras 'glorot_uniform'
_BIAS_INIT = nn.initializers.zeros  # Keras 'zeros'


class FastDropout(nn.Module):
    """``flax.linen.Dropout`` with :func:`imgclf_jax.models.fast_path.dropout`'s mask.

    The same key (``make_rng('dropout')`` under the same layer name), the same
    mask bit for bit and the same scaling as ``nn.Dropout(rate)``; only faster
    on XLA:CPU. Inputs float[...], outputs the same shape.

    `rate` may be a float32[] array (a population's swept rate, traced in the
    step): the layer then always draws its mask, and at rate 0 the mask keeps
    every unit (``u < 1`` for u in [0, 1)) and the scale is 1, so it returns `x`
    exactly, as a plain run without the layer does.
    """

    rate: Any

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or (not _is_array(self.rate) and self.rate == 0.0):
            return x
        return fast_path_lib.dropout(x, self.rate, self.make_rng("dropout"))


class ConvReluMaxPool(nn.Module):
    """``nn.Conv`` (stride 1) -> ReLU -> 2x2/2 max pool as one op (:func:`fast_path.conv_relu_max_pool`).

    The same parameters as ``nn.Conv(features, (k, k), padding=padding)`` with
    this module's initializers ('kernel' float32[k, k, C_in, features], HWIO, then
    'bias' float32[features], drawn in that order), so a run may switch between
    this and the separate layers. Input float32[B, H, W, C_in]; output
    float32[B, H' // 2, W' // 2, features].
    """

    features: int
    kernel_size: int
    padding: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", _KERNEL_INIT, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", _BIAS_INIT, (self.features,), jnp.float32)
        return fast_path_lib.conv_relu_max_pool(x, kernel, bias, self.padding)


class BranchedCNN(nn.Module):
    """The reference CNN: main conv branch, optional pooled side branch, dense head; returns logits.

    Attributes (one entry per main-branch conv layer in the ``conv_*`` tuples):
      num_classes: width of the output layer.
      conv_filters: output channels of each conv.
      conv_kernel_sizes: square kernel size of each conv, pixels.
      conv_paddings: 'SAME' or 'VALID' (case-insensitive), Keras semantics.
      conv_pools: whether a 2x2 stride-2 'valid' max pool follows the conv.
      conv_dropouts: dropout rate after the conv (and pool); 0 = no dropout layer; a float32[]
        array (a population's swept rate) = a layer that draws its mask at any value.
      side_filters: channels of the side branch's conv; 0 = no side branch.
      side_kernel_size: the side conv's square kernel size ('SAME' padding).
      side_pool_size: the side branch's average pool size and stride ('valid').
      dense_units: widths of the hidden dense layers of the head.
      dense_dropouts: dropout rate after each hidden dense layer; 0 = none.
      fast_path: use :mod:`imgclf_jax.models.fast_path`'s ops (same values and gradients,
        faster on CPU); :func:`create_model` decides it from the config and the backend (float32 only).
      dtype: the layers' computation dtype (``model.compute_dtype``); params stay float32.
      precision: the convs' and dense layers' ``jax.lax.Precision`` (None: the backend's default).
    """

    num_classes: int
    conv_filters: Sequence[int] = (32, 64, 128)
    conv_kernel_sizes: Sequence[int] = (3, 3, 3)
    conv_paddings: Sequence[str] = ("VALID", "VALID", "VALID")
    conv_pools: Sequence[bool] = (True, True, True)
    conv_dropouts: Sequence[float] = (0.0, 0.0, 0.0)
    side_filters: int = 0
    side_kernel_size: int = 3
    side_pool_size: int = 16
    dense_units: Sequence[int] = (256,)
    dense_dropouts: Sequence[float] = (0.0,)
    fast_path: bool = False
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Maps images to class logits.

        Args:
          images: float32[B, H, W, 3], pixel values scaled to [0, 1] (or normalized per channel).
          train: enables dropout, which then draws from the 'dropout' rng collection
            (``model.apply(variables, x, train=True, rngs={'dropout': key})``).

        Returns:
          float32[B, num_classes] logits (no softmax), whatever ``dtype`` computes them.
        """
        images = jnp.asarray(images, jnp.float32)
        layer = dict(dtype=self.dtype, precision=self.precision, kernel_init=_KERNEL_INIT, bias_init=_BIAS_INIT)
        x = images
        layers = zip(self.conv_filters, self.conv_kernel_sizes, self.conv_paddings,
                     self.conv_pools, self.conv_dropouts)
        for i, (filters, kernel, padding, pool, rate) in enumerate(layers):
            if pool and self.fast_path:
                x = ConvReluMaxPool(filters, kernel, padding.upper(), name=f"conv_{i}")(x)
            else:
                x = nn.Conv(filters, (kernel, kernel), strides=(1, 1), padding=padding.upper(),
                            name=f"conv_{i}", **layer)(x)
                x = nn.relu(x)
                if pool:
                    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            if _has_dropout(rate):
                x = self._dropout(rate, f"conv_dropout_{i}")(x, deterministic=not train)
        x = x.reshape((x.shape[0], -1))  # row-major (H, W, C), as Keras's Flatten

        if self.side_filters > 0:
            k, p = self.side_kernel_size, self.side_pool_size
            s = nn.Conv(self.side_filters, (k, k), strides=(1, 1), padding="SAME", name="side_conv",
                        **layer)(images)
            s = nn.relu(s)
            if self.fast_path:
                s = fast_path_lib.avg_pool(s, p)
            else:
                s = nn.avg_pool(s, (p, p), strides=(p, p), padding="VALID")
            x = jnp.concatenate([x, s.reshape((s.shape[0], -1))], axis=-1)

        for i, (units, rate) in enumerate(zip(self.dense_units, self.dense_dropouts)):
            x = nn.Dense(units, name=f"dense_{i}", **layer)(x)
            x = nn.relu(x)
            if _has_dropout(rate):
                x = self._dropout(rate, f"dense_dropout_{i}")(x, deterministic=not train)
        return nn.Dense(self.num_classes, name=LOGITS, **layer)(x).astype(jnp.float32)

    def _dropout(self, rate: Any, name: str) -> nn.Module:
        """The dropout layer `name`: :class:`FastDropout` on the fast path or for an array rate (a swept
        one: ``nn.Dropout`` branches on the rate in Python), else ``nn.Dropout``."""
        if self.fast_path or _is_array(rate):
            return FastDropout(rate, name=name)
        return nn.Dropout(rate, name=name)


def _is_array(rate: Any) -> bool:
    """Whether a dropout rate is an array (a population's swept rate, maybe traced), not a Python number."""
    return isinstance(rate, (jax.Array, np.ndarray))


def _has_dropout(rate: Any) -> bool:
    """Whether the layer exists: a rate > 0, or a swept (array) rate, whatever its value."""
    return _is_array(rate) or rate > 0


def _rate(rate: Any) -> Any:
    """A config's dropout rate as the module holds it: a float, or a swept rate's array unchanged."""
    return rate if _is_array(rate) else float(rate)


def create_model(model_config: Any, num_classes: int) -> BranchedCNN:
    """Builds the :class:`BranchedCNN` of a config's ``model`` section for `num_classes` classes.

    ``model.fast_path`` ('auto' when absent, as in runs saved before it existed) is
    resolved here, by :func:`imgclf_jax.backend.enabled`, for the current backend; its kernels are
    float32, so ``model.compute_dtype='bfloat16'`` turns 'auto' off (config.validate refuses 'on').
    ``model.compute_dtype`` and ``model.matmul_precision``: :func:`imgclf_jax.models.base.precision_policy`.
    """
    m = model_config
    dtype, precision = precision_policy(m)
    return BranchedCNN(
        num_classes=int(num_classes),
        conv_filters=tuple(int(f) for f in m.conv_filters),
        conv_kernel_sizes=tuple(int(k) for k in m.conv_kernel_sizes),
        conv_paddings=tuple(str(p).upper() for p in m.conv_paddings),
        conv_pools=tuple(bool(p) for p in m.conv_pools),
        conv_dropouts=tuple(_rate(r) for r in m.conv_dropouts),
        side_filters=int(m.side_filters),
        side_kernel_size=int(m.side_kernel_size),
        side_pool_size=int(m.side_pool_size),
        dense_units=tuple(int(u) for u in m.dense_units),
        dense_dropouts=tuple(_rate(r) for r in m.dense_dropouts),
        fast_path=backend.enabled(str(m.get("fast_path", "auto"))) and dtype == jnp.float32,
        dtype=dtype,
        precision=precision,
    )


# --------------------------------------------------------------------------- L2


def regularized_kernels(params: Any) -> dict[str, jax.Array]:
    """The kernels Keras's ``kernel_regularizer=l2(l)`` covers: every conv and hidden dense, by layer name.

    Biases and the output layer (``logits``) are not regularized, as in the
    reference attempts 5 and 6 (``../shared/seed-attempts.md``).

    Args:
      params: the model's params tree (or its variables ``{'params': ...}``).

    Returns:
      ``{layer name: kernel}`` for every layer with a kernel except ``logits``.
    """
    return {name: layer["kernel"] for name, layer in params_dict(params).items()
            if name != LOGITS and "kernel" in layer}


# --------------------------------------------------------------------------- shapes


def layer_specs(model_config: Any, image_size: int, num_classes: int) -> list[LayerSpec]:
    """The layers of ``create_model(model_config, num_classes)`` on image_size x image_size x 3 images.

    Conv outputs: 'same' keeps the size, 'valid' gives size - k + 1; max pool
    2x2/2 gives size // 2; average pool p/p gives size // p. ReLU is folded into
    its conv or dense row.

    Raises:
      ConfigError: a layer would shrink the image below one pixel.
    """
    m = model_config
    rows: list[LayerSpec] = []
    h = w = int(image_size)
    c = 3

    def check(size: int, what: str, key: str) -> None:
        if size < 1:
            raise ConfigError(
                f"model: {what} leaves no pixels of a {image_size}x{image_size} image; "
                f"change model.{key} or data.image_size")

    for i, (f, k, pad, pool, rate) in enumerate(zip(m.conv_filters, m.conv_kernel_sizes,
                                                    m.conv_paddings, m.conv_pools, m.conv_dropouts)):
        if str(pad).lower() == "valid":
            h, w = h - k + 1, w - k + 1
        check(h, f"conv_{i} ({k}x{k} valid)", "conv_paddings")
        rows.append(LayerSpec(f"conv_{i}", "conv", (h, w, f), k * k * c * f + f,
                              h * w * k * k * c * f, "main"))
        c = f
        if pool:
            h, w = h // 2, w // 2
            check(h, f"the max pool after conv_{i}", "conv_pools")
            rows.append(LayerSpec(f"pool_{i}", "max_pool", (h, w, c), 0, 0, "main"))
        if rate > 0:
            rows.append(LayerSpec(f"conv_dropout_{i}", "dropout", (h, w, c), 0, 0, "main"))
    features = h * w * c
    rows.append(LayerSpec("flatten", "flatten", (features,), 0, 0, "main"))

    if m.side_filters > 0:
        k, p, f = m.side_kernel_size, m.side_pool_size, m.side_filters
        s = int(image_size)
        rows.append(LayerSpec("side_conv", "conv", (s, s, f), k * k * 3 * f + f,
                              s * s * k * k * 3 * f, "side"))
        s //= p
        check(s, f"the side branch's {p}x{p} average pool", "side_pool_size")
        rows.append(LayerSpec("side_pool", "avg_pool", (s, s, f), 0, 0, "side"))
        rows.append(LayerSpec("side_flatten", "flatten", (s * s * f,), 0, 0, "side"))
        features += s * s * f
        rows.append(LayerSpec("concat", "concat", (features,), 0, 0, "head"))

    for i, (units, rate) in enumerate(zip(m.dense_units, m.dense_dropouts)):
        rows.append(LayerSpec(f"dense_{i}", "dense", (units,), features * units + units,
                              features * units, "head"))
        features = units
        if rate > 0:
            rows.append(LayerSpec(f"dense_dropout_{i}", "dropout", (units,), 0, 0, "head"))
    rows.append(LayerSpec(LOGITS, "dense", (num_classes,), features * num_classes + num_classes,
                          features * num_classes, "head"))
    return rows


# --------------------------------------------------------------------------- config


def config() -> ml_collections.ConfigDict:
    """The branched CNN's own ``model.*`` keys with their defaults (attempt 1's model)."""
    m = ml_collections.ConfigDict()
    m.conv_filters = (32, 64, 128)  # main branch, one entry per conv layer
    m.conv_kernel_sizes = (3, 3, 3)  # square kernels, pixels
    m.conv_paddings = ("valid", "valid", "valid")  # 'same' or 'valid', Keras semantics
    m.conv_pools = (True, True, True)  # 2x2 stride-2 max pool after the conv
    m.conv_dropouts = (0.0, 0.0, 0.0)  # dropout rate after the conv (and pool)
    m.side_filters = 0  # side branch from the input: Conv(side_filters); 0 = no side branch
    m.side_kernel_size = 3
    m.side_pool_size = 16  # side branch average pool, size = stride, pixels
    m.dense_units = (256,)  # hidden dense layers of the head (the output layer is added)
    m.dense_dropouts = (0.0,)  # dropout rate after each hidden dense layer
    return m


def validate(model_config: Any, image_size: int) -> None:
    """Refuses impossible values of the branched CNN's keys (one line naming the key).

    The fit of the layers to `image_size` is :func:`layer_specs`'s check (the training
    loop runs it before loading any data); `image_size` is not used here.

    Raises:
      ConfigError: ``config key 'model.K' must be ..., got V``.
    """
    m = model_config
    n = len(m.conv_filters)
    for key in ("conv_kernel_sizes", "conv_paddings", "conv_pools", "conv_dropouts"):
        require(len(m[key]) == n, m, key, f"of length {n} (one per conv_filters entry)")
    require(n >= 1 and all(f >= 1 for f in m.conv_filters), m, "conv_filters", "ints >= 1")
    require(all(k >= 1 for k in m.conv_kernel_sizes), m, "conv_kernel_sizes", "ints >= 1")
    require(all(p in PADDINGS for p in m.conv_paddings), m, "conv_paddings", f"each in {PADDINGS}")
    require(all(0 <= r < 1 for r in m.conv_dropouts), m, "conv_dropouts", "rates in [0, 1)")
    require(len(m.dense_dropouts) == len(m.dense_units), m, "dense_dropouts",
            f"of length {len(m.dense_units)} (one per dense_units entry)")
    require(all(u >= 1 for u in m.dense_units), m, "dense_units", "ints >= 1")
    require(all(0 <= r < 1 for r in m.dense_dropouts), m, "dense_dropouts", "rates in [0, 1)")
    require(m.side_filters >= 0, m, "side_filters", ">= 0 (0 = no side branch)")
    require(m.side_kernel_size >= 1, m, "side_kernel_size", ">= 1")
    require(m.side_pool_size >= 1, m, "side_pool_size", ">= 1")


def describe(model_config: Any) -> str:
    """The banner's words for the model: ``conv (32, 64, 128) + [side branch N filters +] dense (256,)``."""
    m = model_config
    parts = [f"conv {tuple(m.conv_filters)}"]
    if m.side_filters:
        parts.append(f"side branch {m.side_filters} filters")
    parts.append(f"dense {tuple(m.dense_units)}")
    return " + ".join(parts)


ENTRY = register(ModelEntry(
    name="branched_cnn",
    module_type=BranchedCNN,
    config=config,
    validate=validate,
    create=create_model,
    layer_specs=layer_specs,
    regularized_kernels=regularized_kernels,
    size_keys=("conv_filters", "dense_units"),
    describe=describe,
    precision_policy=True,
))
