"""Residual CNNs with BatchNorm: one configurable Flax linen :class:`ResNet` and its named variants.

The shape (He et al. 2016, "Deep Residual Learning", basic blocks; torchvision's
``resnet.py`` and the flax examples' ``imagenet/models.py`` for the details):

- stem: ``Conv(stem_width, stem_kernel x stem_kernel, stride stem_stride)`` -> BN -> ReLU,
  then, with ``stem_pool='max'``, a 3x3 stride-2 'SAME' max pool (torchvision / flax examples);
- stages ``i`` with ``widths[i]``, ``depths[i]`` blocks and ``strides[i]``, downsampling by
  ``downsample``:

  - ``'stride'`` (the ResNet way): ``depths[i]`` basic blocks, the first one strided by
    ``strides[i]``;
  - ``'max_pool'`` (the "How to train your ResNet" / ResNet-9 way, Page 2018): ``Conv 3x3`` to
    ``widths[i]`` -> BN -> ReLU, then a max pool of size = stride = ``strides[i]`` ('VALID';
    none when the stride is 1), then ``depths[i]`` (may be 0) basic blocks at that width;

- basic block: ``conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut (the
  identity, or ``conv1x1(stride) -> BN`` when the shape changes), then ReLU after the add;
- head: global ``pool`` ('avg' or 'max' over H, W) -> ``Dense(num_classes)`` named ``logits``.
  The module returns logits (the softmax lives in the loss).

Convs before a BatchNorm have no bias. Padding is symmetric ``k // 2`` (torchvision's and the
flax examples'), so a k x k conv with stride s (k odd) maps H to ceil(H / s), as does the 1x1
projection. Initialization: conv kernels He/kaiming normal, fan_out mode, gain 2
(``std = sqrt(2 / (k * k * C_out))``, untruncated; torchvision's ResNet,
``kaiming_normal_(mode='fan_out', nonlinearity='relu')``); BatchNorm scale 1 and bias 0 (the
last BN of each block scale 0 with ``zero_init_residual``, Goyal et al. 2017, so every block
starts as its shortcut); the ``logits`` Dense has flax's defaults (lecun normal kernel, zero bias).

BatchNorm (``flax.linen.BatchNorm``): in training (``train=True``, applied with
``mutable=['batch_stats']``) each BN normalizes with the statistics of the batch, computed over
the rows where ``mask`` is True only (the pipeline's padding rows never enter them), and updates
its running averages: ``running = bn_momentum * running + (1 - bn_momentum) * batch`` (flax's
convention; torch's momentum 0.1 is flax's 0.9). The variance is the biased one (flax's, over
B x H x W). In evaluation (``train=False``) the running averages are used and nothing changes.
Under ``jax.jit`` with the batch sharded over a mesh the mean over the batch axis is a global
mean (GSPMD inserts the all-reduce), so the statistics are over the global batch. A training
batch must hold at least one real row (the pipeline's do): with none the statistics are NaN.

Param names: ``stem_conv``, ``stem_bn``; stride mode ``stage{i}_block{j}/{conv1,bn1,conv2,bn2,
proj_conv,proj_bn}``; max-pool mode also ``stage{i}_conv``, ``stage{i}_bn``; ``logits``. The
``batch_stats`` collection mirrors every ``*bn*`` name with ``mean`` and ``var``.

Registered (``config.model.name``): ``'resnet'`` (:data:`ResNetSmall`, the configurable family
at small CPU-friendly defaults), ``'resnet18'`` (:data:`ResNet18`, ImageNet ResNet-18) and
``'resnet9'`` (:data:`ResNet9`, the DAWNBench net); all three have the same keys (the fields of
:class:`ResNet` but ``num_classes``), at their own defaults. ``model.l2`` applies to every conv
and dense kernel (``logits`` included), not to BN scales and biases. There are no fast-path
kernels: ``model.fast_path='on'`` is refused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from imgclf_jax.errors import ConfigError
from imgclf_jax.models.base import LayerSpec, ModelEntry, params_dict, precision_policy, register, require

LOGITS = "logits"
STEM_POOLS = ("none", "max")  # model.stem_pool
DOWNSAMPLES = ("stride", "max_pool")  # model.downsample
POOLS = ("avg", "max")  # model.pool

# torchvision ResNet: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"); for HWIO kernels
# jax's fan_out is k * k * C_out (the receptive field times the output channels), as torch's.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any = jnp.float32,
          precision: Any = None) -> nn.Conv:
    """A bias-free k x k conv with stride `stride` and symmetric k // 2 padding (output ceil(H / stride)),
    computing in `dtype` at `precision` (float32 params)."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=_CONV_INIT, dtype=dtype, precision=precision, name=name)


def _batch_norm(x: jax.Array, *, train: bool, mask: jax.Array | None, momentum: float, epsilon: float,
                name: str, zero_scale: bool = False, dtype: Any = jnp.float32) -> jax.Array:
    """``nn.BatchNorm`` on x float[B, H, W, C]: batch statistics over the rows where `mask` (bool[B]) is
    True when `train`, the running averages otherwise; output in `dtype` (the statistics are reduced
    in float32 and kept float32 whatever `dtype` is: flax's ``force_float32_reductions``). Call inside a
    compact method (the caller owns it)."""
    bn = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones, name=name)
    if mask is None or not train:
        return bn(x)
    return bn(x, mask=jnp.broadcast_to(jnp.reshape(mask, (-1,) + (1,) * (x.ndim - 1)), x.shape))


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut (identity, or conv1x1(stride)-BN), ReLU after the add.

    Input float32[B, H, W, C_in]; output float32[B, ceil(H / stride), ceil(W / stride), features].
    The projection shortcut exists when ``stride != 1`` or ``C_in != features``.
    """

    features: int
    stride: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        norm = functools.partial(_batch_norm, train=train, mask=mask, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, dtype=self.dtype)
        conv = functools.partial(_conv, dtype=self.dtype, precision=self.precision)
        y = conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(norm(y, name="bn1"))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = norm(y, name="bn2", zero_scale=self.zero_init_residual)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = norm(conv(self.features, 1, self.stride, "proj_conv")(x), name="proj_bn")
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """A residual CNN with BatchNorm (see the module docstring); returns logits.

    Attributes:
      num_classes: width of the output layer.
      stem_width: output channels of the stem conv.
      stem_kernel: the stem conv's square kernel size (odd), pixels.
      stem_stride: the stem conv's stride.
      stem_pool: 'none', or 'max' (3x3 stride-2 'SAME' max pool after the stem).
      widths: channels of each stage.
      depths: basic blocks per stage (>= 1 with 'stride', >= 0 with 'max_pool').
      strides: each stage's downsampling factor (its first block's stride, or its max pool's size).
      downsample: 'stride' (strided first block) or 'max_pool' (conv-BN-ReLU then max pool).
      pool: the global pool before the head, 'avg' or 'max'.
      bn_momentum: running = momentum * running + (1 - momentum) * batch (flax convention).
      bn_epsilon: added to the variance.
      zero_init_residual: the last BN scale of each block starts at 0 (each block starts as its shortcut).
      dtype: the layers' computation dtype (``model.compute_dtype``); params and BatchNorm statistics
        stay float32, the logits are float32.
      precision: the convs' and the dense layer's ``jax.lax.Precision`` (None: the backend's default).
    """

    num_classes: int
    stem_width: int = 32
    stem_kernel: int = 3
    stem_stride: int = 2
    stem_pool: str = "none"
    widths: Sequence[int] = (32, 64, 128)
    depths: Sequence[int] = (1, 1, 1)
    strides: Sequence[int] = (1, 2, 2)
    downsample: str = "stride"
    pool: str = "avg"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """Maps images to class logits.

        Args:
          images: float32[B, H, W, 3].
          train: BatchNorm uses (and updates: apply with ``mutable=['batch_stats']``) the batch's
            statistics; else the running averages.
          mask: bool[B], the rows whose values enter the batch statistics (False: padding rows, whose
            pixels may be anything); None = every row. Only read when `train`.

        Returns:
          float32[B, num_classes] logits (no softmax).
        """
        norm = functools.partial(_batch_norm, train=train, mask=mask, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, dtype=self.dtype)
        conv = functools.partial(_conv, dtype=self.dtype, precision=self.precision)
        block = functools.partial(BasicBlock, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                                  zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                                  precision=self.precision)
        x = jnp.asarray(images, jnp.float32)
        x = conv(self.stem_width, self.stem_kernel, self.stem_stride, "stem_conv")(x)
        x = nn.relu(norm(x, name="stem_bn"))
        if self.stem_pool == "max":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, (width, depth, stride) in enumerate(zip(self.widths, self.depths, self.strides)):
            if self.downsample == "max_pool":
                x = nn.relu(norm(conv(width, 3, 1, f"stage{i}_conv")(x), name=f"stage{i}_bn"))
                if stride > 1:
                    x = nn.max_pool(x, (stride, stride), strides=(stride, stride), padding="VALID")
                for j in range(depth):
                    x = block(width, 1, name=f"stage{i}_block{j}")(x, train=train, mask=mask)
            else:
                for j in range(depth):
                    x = block(width, stride if j == 0 else 1, name=f"stage{i}_block{j}")(
                        x, train=train, mask=mask)
        x = jnp.mean(x, axis=(1, 2)) if self.pool == "avg" else jnp.max(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision, name=LOGITS)(x).astype(
            jnp.float32)


# The named variants, flax examples style (``ResNet18 = partial(ResNet, ...)``); each is a registered entry
# whose config defaults are these keywords over ResNet's own defaults.

# 'resnet': ResNet's defaults. A small net for 100x100 images on a 2-core CPU: a 3x3 stride-2 stem (no
# max pool) to 50x50, three stages of one block each (32, 64, 128 channels at 50, 25, 13 pixels): about
# 0.3M parameters and 0.25 GFLOP per 100x100 image forward, ~1/12 of the reference ml6 CNN's 2.95.
ResNetSmall = functools.partial(ResNet)
# ImageNet ResNet-18 (torchvision resnet18: 11,689,512 parameters at 1000 classes).
ResNet18 = functools.partial(ResNet, stem_width=64, stem_kernel=7, stem_stride=2, stem_pool="max",
                             widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), strides=(1, 2, 2, 2))
# The DAWNBench ResNet-9 (Page, "How to train your ResNet", 2018): prep 64; layer1 128 + pool + res;
# layer2 256 + pool; layer3 512 + pool + res; global max pool. Differences from the original: its residual
# branch is (conv-BN-ReLU) x 2 added to the input (ReLU before the add), here a basic block (ReLU after the
# add); its classifier has no bias and a 0.125 output scale, here a plain Dense.
ResNet9 = functools.partial(ResNet, stem_width=64, stem_kernel=3, stem_stride=1, stem_pool="none",
                            widths=(128, 256, 512), depths=(1, 0, 1), strides=(2, 2, 2),
                            downsample="max_pool", pool="max")

VARIANTS = {"resnet": ResNetSmall, "resnet18": ResNet18, "resnet9": ResNet9}

KEYS = tuple(f.name for f in dataclasses.fields(ResNet)
             if f.name not in ("num_classes", "parent", "name", "dtype", "precision"))


def _defaults(variant: functools.partial) -> dict[str, Any]:
    """``{key: default}`` of a variant: ResNet's field defaults, then the partial's keywords."""
    values = {f.name: f.default for f in dataclasses.fields(ResNet) if f.name in KEYS}
    values.update(variant.keywords)
    return values


def create_model(model_config: Any, num_classes: int) -> ResNet:
    """The :class:`ResNet` of a config's ``model`` section (any of the variants: the keys are the same).

    Raises:
      ConfigError: ``model.fast_path='on'`` (the ResNet has no fast-path kernels).
    """
    m = model_config
    _check_fast_path(m)
    dtype, precision = precision_policy(m)
    return ResNet(
        num_classes=int(num_classes),
        stem_width=int(m.stem_width), stem_kernel=int(m.stem_kernel), stem_stride=int(m.stem_stride),
        stem_pool=str(m.stem_pool),
        widths=tuple(int(w) for w in m.widths), depths=tuple(int(d) for d in m.depths),
        strides=tuple(int(s) for s in m.strides),
        downsample=str(m.downsample), pool=str(m.pool),
        bn_momentum=float(m.bn_momentum), bn_epsilon=float(m.bn_epsilon),
        zero_init_residual=bool(m.zero_init_residual),
        dtype=dtype, precision=precision,
    )


# --------------------------------------------------------------------------- L2


def regularized_kernels(params: Any) -> dict[str, jax.Array]:
    """Every conv and dense kernel (``logits`` included), by layer path (``stage0_block0/conv1``).

    BatchNorm scales and biases and the logits bias are not regularized (weight decay on BN
    parameters is commonly left out: Goyal et al. 2017, torchvision's recipes' ``norm_weight_decay=0``).

    Args:
      params: the params tree (or the variables ``{'params': ...}``).
    """
    out = {}

    def walk(tree, path):
        for name, value in tree.items():
            if name == "kernel" and not hasattr(value, "items"):
                out["/".join(path)] = value
            elif hasattr(value, "items"):
                walk(value, path + (name,))

    walk(params_dict(params), ())
    return out


# --------------------------------------------------------------------------- shapes


def layer_specs(model_config: Any, image_size: int, num_classes: int) -> list[LayerSpec]:
    """The layers of ``create_model(model_config, num_classes)`` on image_size x image_size x 3 images.

    Rows: the stem conv, BN, pool; per block its convs, BNs, projection shortcut and the add
    (ReLUs folded into the row before them); per max-pool stage its conv, BN and pool; the global
    pool; ``logits``. Params count kernels and BN scale + bias (the running mean and variance are
    state, not params). MACs: convs and the dense layer only.

    Raises:
      ConfigError: a max pool would shrink the image below one pixel (naming the key).
    """
    m = model_config
    rows: list[LayerSpec] = []
    h, c = int(image_size), 3  # the current activation: h x h x c

    def conv(name, c_in, h_in, f, k, s, branch):
        """A conv row on an h_in x h_in x c_in input; returns its output size ceil(h_in / s)."""
        out = -(-h_in // s)  # symmetric k // 2 padding
        rows.append(LayerSpec(name, "conv", (out, out, f), k * k * c_in * f, out * out * k * k * c_in * f,
                              branch))
        return out

    def bn(name, size, channels, branch):
        rows.append(LayerSpec(name, "batch_norm", (size, size, channels), 2 * channels, 0, branch))

    h = conv("stem_conv", c, h, int(m.stem_width), int(m.stem_kernel), int(m.stem_stride), "stem")
    c = int(m.stem_width)
    bn("stem_bn", h, c, "stem")
    if m.stem_pool == "max":
        h = -(-h // 2)  # 3x3 stride 2 'SAME'
        rows.append(LayerSpec("stem_pool", "max_pool", (h, h, c), 0, 0, "stem"))
    for i, (f, depth, s) in enumerate(zip(m.widths, m.depths, m.strides)):
        f, depth, s = int(f), int(depth), int(s)
        branch = f"stage{i}"
        if m.downsample == "max_pool":
            h = conv(f"{branch}_conv", c, h, f, 3, 1, branch)
            c = f
            bn(f"{branch}_bn", h, c, branch)
            if s > 1:
                if h // s < 1:
                    raise ConfigError(
                        f"model: the {s}x{s} max pool of {branch} gets a {h}x{h} input from a "
                        f"{image_size}x{image_size} image and leaves no pixels; change model.strides "
                        "or data.image_size")
                h //= s
                rows.append(LayerSpec(f"{branch}_pool", "max_pool", (h, h, c), 0, 0, branch))
        for j in range(depth):
            stride = s if (j == 0 and m.downsample == "stride") else 1
            prefix = f"{branch}_block{j}/"
            out = conv(prefix + "conv1", c, h, f, 3, stride, branch)
            bn(prefix + "bn1", out, f, branch)
            conv(prefix + "conv2", f, out, f, 3, 1, branch)
            bn(prefix + "bn2", out, f, branch)
            if stride != 1 or c != f:
                conv(prefix + "proj_conv", c, h, f, 1, stride, branch)
                bn(prefix + "proj_bn", out, f, branch)
            h, c = out, f
            rows.append(LayerSpec(prefix + "add", "add", (h, h, c), 0, 0, branch))
    rows.append(LayerSpec("global_pool", f"global_{m.pool}_pool", (c,), 0, 0, "head"))
    rows.append(LayerSpec(LOGITS, "dense", (num_classes,), c * num_classes + num_classes,
                          c * num_classes, "head"))
    return rows


# --------------------------------------------------------------------------- config


def config_for(variant: str) -> ml_collections.ConfigDict:
    """The ``model.*`` keys of variant `variant` ('resnet', 'resnet18', 'resnet9') with its defaults."""
    m = ml_collections.ConfigDict()
    for key, value in _defaults(VARIANTS[variant]).items():
        m[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return m


def _check_fast_path(m: Any) -> None:
    fast_path = m.get("fast_path", "auto")
    if fast_path == "on":
        raise ConfigError(f"config key 'model.fast_path' must be 'auto' or 'off' for model.name="
                          f"'{m.get('name', 'resnet')}' (it has no fast-path kernels), got 'on'")


def validate(model_config: Any, image_size: int) -> None:
    """Refuses impossible values of the ResNet's keys, and a max-pool stage the image is too small for.

    Raises:
      ConfigError: ``config key 'model.K' must be ..., got V`` (one line), or the fit message of
        :func:`layer_specs`.
    """
    m = model_config

    def ints(values, low):
        return all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)

    require(isinstance(m.stem_width, int) and m.stem_width >= 1, m, "stem_width", "an int >= 1")
    require(isinstance(m.stem_kernel, int) and m.stem_kernel >= 1 and m.stem_kernel % 2 == 1, m,
            "stem_kernel", "an odd int >= 1")
    require(isinstance(m.stem_stride, int) and m.stem_stride >= 1, m, "stem_stride", "an int >= 1")
    require(m.stem_pool in STEM_POOLS, m, "stem_pool", f"one of {STEM_POOLS}")
    require(m.downsample in DOWNSAMPLES, m, "downsample", f"one of {DOWNSAMPLES}")
    require(m.pool in POOLS, m, "pool", f"one of {POOLS}")
    n = len(m.widths)
    require(n >= 1 and ints(m.widths, 1), m, "widths", "a non-empty tuple of ints >= 1")
    require(len(m.depths) == n, m, "depths", f"of length {n} (one per widths entry)")
    require(len(m.strides) == n, m, "strides", f"of length {n} (one per widths entry)")
    if m.downsample == "stride":
        require(ints(m.depths, 1), m, "depths", "ints >= 1 with model.downsample='stride'")
    else:
        require(ints(m.depths, 0), m, "depths", "ints >= 0")
    require(ints(m.strides, 1), m, "strides", "ints >= 1")
    require(0.0 <= m.bn_momentum < 1.0, m, "bn_momentum", "in [0, 1)")
    require(m.bn_epsilon > 0, m, "bn_epsilon", "> 0")
    require(isinstance(m.zero_init_residual, bool), m, "zero_init_residual", "True or False")
    _check_fast_path(m)
    layer_specs(m, image_size, 1)  # the fit of the max pools to the image


def describe(model_config: Any) -> str:
    """The banner's words: ``ResNet: stem 64 7x7/2 + max pool, widths (..), depths (..), strides (..), ...``."""
    m = model_config
    pool = " + max pool" if m.stem_pool == "max" else ""
    return (f"ResNet: stem {m.stem_width} {m.stem_kernel}x{m.stem_kernel}/{m.stem_stride}{pool}, widths "
            f"{tuple(m.widths)}, depths {tuple(m.depths)}, strides {tuple(m.strides)}, downsample "
            f"'{m.downsample}', global {m.pool} pool")


ENTRIES = {name: register(ModelEntry(
    name=name,
    module_type=ResNet,
    config=functools.partial(config_for, name),
    validate=validate,
    create=create_model,
    layer_specs=layer_specs,
    regularized_kernels=regularized_kernels,
    size_keys=("stem_width", "widths", "depths"),
    describe=describe,
    takes_mask=True,
    precision_policy=True,
)) for name in VARIANTS}

