"""The CPU fast path: layer implementations whose gradients XLA:CPU computes slowly.

Where they are used is the backend policy's decision (:func:`imgclf_jax.backend.enabled`:
``config.model.fast_path`` and the ``IMGCLF_JAX_FAST_PATH`` environment variable),
which also sets the XLA:CPU flag that goes with them (:func:`imgclf_jax.backend.configure_xla`).
The results do not change: every fast op computes the same values and gradients
as the op it replaces (bit for bit for the max pool, the conv block's values and
input/kernel gradients, and the dropout mask; to float rounding for the conv
block's bias gradient and the average pool, see tests/test_fast_path.py), so a
run may switch between them and resume.

Ops:

- :func:`conv_relu_max_pool` (:class:`imgclf_jax.models.cnn.ConvReluMaxPool`):
  every conv followed by a max pool, as one op with a custom VJP that pools
  before the bias and the ReLU (exact: both commute with the max) and writes
  the full-size activations and their gradient once each instead of three and
  two times. Attempt 1's step: 170 -> 183 images/s.

- :func:`max_pool_2x2`: the 2x2, stride-2, 'valid' max pool of the reference
  models, as the conv block computes it. XLA:CPU lowers the gradient of
  ``reduce_window`` max (``select_and_scatter``) to index arrays, an argmax reduce-window and a
  scatter: measured 359 ms for attempt 1's first pool (32x126x126x32) on the
  2-core EPYC, against 45 ms for this custom VJP, which compares each of the
  window's 4 inputs with the output and routes the gradient to the first one
  that equals it (row-major, as ``select_and_scatter`` with ``ge`` does, so
  ties on the zeros after a ReLU go where they went).

- :func:`avg_pool`: an average pool whose size equals its stride (the side
  branch's 16x16/16 pool), as a reshape and a mean. XLA:CPU computes the
  gradient of ``reduce_window`` add as another reduce-window over the padded,
  dilated cotangent (256 adds per output element for 16x16): 0.94 s of ml6's
  2.7 s step; the reshape form's gradient is a broadcast.

- :func:`dropout` (:class:`imgclf_jax.models.cnn.FastDropout`): the same mask
  as ``flax.linen.Dropout`` bit for bit, with the Threefry cipher written in
  ``jnp`` ops (:func:`threefry2x32`) so that XLA:CPU fuses it into one loop;
  jax lowers its own threefry on the CPU as a rolled loop over memory. The
  three dropout masks of attempt 6's convs, each timed alone: 340 ms against
  22 ms; attempt 6's step: 22.2 -> 25.8 images/s.

The XLA:CPU flag for the convolutions is :data:`imgclf_jax.backend.XLA_CPU_FLAG`.

Tried and left out (numbers in benchmarks/README.md, "CPU fast path"; rerun
with ``python -m benchmarks.conv_kernel_gradient``): computing conv kernel
gradients as shifted matmuls instead of XLA's convolution over the batch. On
this project's 2-core EPYC it was faster for some layers alone but made the
whole ml1 and ml6 steps slower, so the convs stay XLA's. Also left out: the
kernel gradient from explicitly transposed operands (ml1 +3%, ml6 -4%), and
jax's own unrolled threefry lowering (a global registration; without the
barrier it made ml6 slower, 14.5 against 21.8 images/s).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """Average pool with window = stride = `size`, 'valid' padding (trailing rows/columns dropped).

    Equals ``flax.linen.avg_pool(x, (size, size), strides=(size, size), padding='VALID')``
    up to float rounding (the mean is summed in another order).

    Args:
      x: float[B, H, W, C].

    Returns:
      float[B, H // size, W // size, C].
    """
    b, h, w, c = x.shape
    hp, wp = h // size, w // size
    return x[:, : hp * size, : wp * size, :].reshape(b, hp, size, wp, size, c).mean(axis=(2, 4))


def _window_corners(x: jax.Array) -> list[jax.Array]:
    """float[B, H, W, C] -> the 2x2 windows' four elements, row-major: 4 x [B, H//2, W//2, C].

    An odd last row or column is dropped ('valid' pooling).
    """
    hp, wp = x.shape[1] // 2, x.shape[2] // 2
    return [x[:, r: 2 * hp: 2, c: 2 * wp: 2, :] for r in (0, 1) for c in (0, 1)]


def _pool_max(x: jax.Array) -> jax.Array:
    """The 2x2/2 'valid' max pool as three elementwise maxima (a loop XLA fuses with its neighbours)."""
    a, b, c, d = _window_corners(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _first_max_index(x: jax.Array, pooled: jax.Array) -> jax.Array:
    """int8[B, H//2, W//2, C]: which of each window's 4 elements (row-major) is the first equal to `pooled`.

    The element the gradient of a max pool goes to: ``select_and_scatter`` with
    ``ge``, XLA's gradient of ``reduce_window`` max, sends it to the first maximum.
    """
    a, b, c, _ = _window_corners(x)
    index = jnp.where(a == pooled, 0, jnp.where(b == pooled, 1, jnp.where(c == pooled, 2, 3)))
    index = index.astype(jnp.int8)
    # Materialized (a quarter-size int8 array): left free, XLA fuses the comparisons into each of
    # the 4 full-size gradient elements that read the index (ml1's step: +8%, ml6's: +4%).
    return lax.optimization_barrier(index)


def _route_to_max(index: jax.Array, g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The max pool's input gradient: float[shape] = `g` at each window's `index` element, 0 elsewhere.

    One elementwise expression over the windows' own layout [B, H//2, 2, W//2, 2, C]
    (a reshape gives [B, H, W, C]), so XLA writes it in one pass, or fuses it into
    the transpose that the next convolution's kernel gradient reads.
    """
    b, h, w, c = shape
    hp, wp = h // 2, w // 2
    corner = jnp.arange(4, dtype=jnp.int8).reshape(1, 1, 2, 1, 2, 1)
    dx = jnp.where(index[:, :, None, :, None, :] == corner, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    dx = dx.reshape(b, 2 * hp, 2 * wp, c)
    if (h, w) != (2 * hp, 2 * wp):
        dx = jnp.pad(dx, ((0, 0), (0, h - 2 * hp), (0, w - 2 * wp), (0, 0)))
    return dx


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, 'valid' padding (= ``flax.linen.max_pool(x, (2, 2), (2, 2), 'VALID')``).

    Values and gradients equal flax's bit for bit (the gradient goes to each
    window's first maximum, row-major). The model uses :func:`conv_relu_max_pool`,
    which contains this pool; this standalone op is what ``benchmarks.profile_step``
    times per pool.

    Args:
      x: float[B, H, W, C].

    Returns:
      float[B, H // 2, W // 2, C].
    """
    return _pool_max(x)


def _max_pool_fwd(x):
    y = _pool_max(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    x, y = residuals
    return (_route_to_max(_first_max_index(x, y), g, x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


# --------------------------------------------------------------------------- conv + ReLU + max pool

CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")  # flax.linen.Conv's, and Keras's channels-last


def _conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=CONV_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_relu_max_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: str) -> jax.Array:
    """``max_pool_2x2(relu(conv(x, kernel) + bias))``: one conv block of the reference CNN.

    Equals ``nn.max_pool(nn.relu(nn.Conv(...)(x)), (2, 2), (2, 2), 'VALID')``
    (stride-1 conv, no dilation): the same values bit for bit, the same input and
    kernel gradients bit for bit, the bias gradient to float rounding (summed over
    the pooled positions, the only ones whose gradient is not zero). Computed in
    another order, which is exact: the pool is taken before the bias and the ReLU
    (adding a per-channel constant and a ReLU are monotonic, so they commute with
    the max, and the gradient's first maximum is the same element), so the
    full-size activations are written once (the conv's output) instead of three
    times (conv, bias + ReLU, pool input); the backward pass builds the
    full-size gradient in one pass from a per-window int8 index.
    Attempt 1's step: 170 -> 183 images/s on the 2-core EPYC (benchmarks/README.md).

    Args:
      x: float32[B, H, W, C_in].
      kernel: float32[k, k, C_in, C_out] (HWIO, as ``nn.Conv``'s 'kernel').
      bias: float32[C_out].
      padding: 'SAME' or 'VALID' (static).

    Returns:
      float32[B, H' // 2, W' // 2, C_out], H' = H for 'SAME', H - k + 1 for 'VALID'.
    """
    return jnp.maximum(_pool_max(_conv(x, kernel, padding)) + bias, 0.0)


def _conv_relu_max_pool_fwd(x, kernel, bias, padding):
    y = _conv(x, kernel, padding)
    pooled = _pool_max(y) + bias
    # Materialized once: left free, XLA recomputes pool and ReLU inside the next layer's transposes.
    out = lax.optimization_barrier(jnp.maximum(pooled, 0.0))
    return out, (x, kernel, bias, y, pooled)


def _conv_relu_max_pool_bwd(padding, residuals, g):
    x, kernel, bias, y, pooled = residuals
    g_pooled = jnp.where(pooled > 0, g, jnp.zeros_like(g))  # ReLU's gradient (0 at 0, as jax.nn.relu)
    # The unpooled values are y + bias as the separate layers computed them, so ties resolve as there.
    g_y = _route_to_max(_first_max_index(y + bias, pooled), g_pooled, y.shape)
    _, conv_vjp = jax.vjp(lambda v, k: _conv(v, k, padding), x, kernel)
    g_x, g_kernel = conv_vjp(g_y)
    return g_x, g_kernel, g_pooled.sum(axis=(0, 1, 2))


conv_relu_max_pool.defvjp(_conv_relu_max_pool_fwd, _conv_relu_max_pool_bwd)


# --------------------------------------------------------------------------- dropout

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key1: jax.Array, key2: jax.Array, x1: jax.Array,
                 x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher, 20 rounds, as ``jax.random``'s threefry2x32 computes it.

    Source: Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as
    1, 2, 3" (SC 2011), Threefry-2x32-20 with its rotation constants and key
    schedule; the same rounds as jax's own lowering (``jax._src.random.threefry2x32``).

    Written out with ``jnp`` ops so that XLA fuses it into one elementwise loop.
    On the CPU, jax lowers its threefry primitive as a rolled ``while`` loop whose
    5 iterations each write the whole counter arrays to memory: 185 ms for the
    32x128x128x32 dropout mask of attempt 6's first conv on the 2-core EPYC,
    against 12 ms for this form (``benchmarks/README.md``).

    Args:
      key1, key2: uint32 scalars, the key's two words.
      x1, x2: uint32 arrays of one shape, the counter's two words.

    Returns:
      Two uint32 arrays of that shape.
    """
    ks = (key1, key2, key1 ^ key2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = lax.shift_left(x2, jnp.uint32(r)) | lax.shift_right_logical(x2, jnp.uint32(32 - r))
            x2 = x1 ^ x2
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _threefry_key_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """A threefry key's two uint32 words, or None for a key of another PRNG implementation."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        data = jax.random.key_data(key)
    elif key.dtype == jnp.uint32 and key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32":
        data = key  # a raw (legacy) key of the default implementation
    else:
        return None
    return data[0], data[1]


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, bit for bit, computed by :func:`threefry2x32`.

    Follows jax's recipe for a threefry key (``jax_threefry_partitionable``, the
    default since jax 0.5): the counter of element i (row-major) is the uint64 i
    as two uint32 words, the 32 random bits are the cipher's two outputs xor-ed,
    their top 23 bits the mantissa of a float32 u in [1, 2), minus 1 = uniform in
    [0, 1), and the result is ``u < p``. Falls back to ``jax.random.bernoulli`` for
    other keys or settings (tests/test_fast_path.py checks the equality).

    Args:
      key: a PRNG key (typed, or a raw uint32[2] key).
      p: probability of True, a Python float (rounded to float32, as jax does).
      shape: the output shape.

    Returns:
      bool[shape].
    """
    words = _threefry_key_words(key)
    size = math.prod(shape)
    if words is None or not jax.config.jax_threefry_partitionable or size >= 2**32:
        return jax.random.bernoulli(key, p, shape)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    index = sum((lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(s)
                 for d, s in enumerate(strides) if shape[d] > 1), jnp.zeros(shape, jnp.uint32))
    bits1, bits2 = threefry2x32(words[0], words[1], jnp.zeros(shape, jnp.uint32), index)
    bits = bits1 ^ bits2
    one = np.array(1.0, np.float32).view(np.uint32)
    u = lax.bitcast_convert_type(lax.shift_right_logical(bits, jnp.uint32(9)) | one, jnp.float32) - 1.0
    return u < jnp.float32(p)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout, as ``flax.linen.Dropout(rate)(x, deterministic=False, rng=key)`` computes it.

    Same mask (:func:`bernoulli`, bit for bit), same scaling by 1 / (1 - rate).
    The mask goes through ``lax.optimization_barrier`` so that XLA computes it
    once: left free, XLA fuses the cipher into each of the mask's users (the
    forward select, its gradient) and the step got slower than with jax's own
    rolled loop (ml6: 14.5 against 21.8 images/s).

    Args:
      x: float[...] activations.
      rate: the fraction dropped, in [0, 1): a float, or a float32[] array (a swept rate, maybe traced).
      key: the dropout key (``make_rng('dropout')`` of the layer).

    Returns:
      float[...] like `x`.
    """
    keep_prob = 1.0 - rate
    keep = lax.optimization_barrier(bernoulli(key, keep_prob, x.shape))
    return lax.select(keep, (x / keep_prob).astype(x.dtype), jnp.zeros_like(x))
