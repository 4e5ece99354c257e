"""The CPU fast path: layer implementations whose gradients XLA:CPU computes slowly, and where to use them.

One place decides (:func:`enabled`): ``config.model.fast_path`` is 'auto' (on
for the CPU backend, off elsewhere: on GPU, cuDNN's kernels already win),
'on' or 'off'; the environment variable ``IMGCLF_JAX_FAST_PATH=0`` turns it
off whatever the config says (``=1`` turns it on). The results do not change:
every fast op computes the same values and gradients as the op it replaces
(bit for bit for the max pool; to float rounding for the conv, see
tests/test_fast_path.py), so a run may switch between them and resume.

Ops:

- :func:`max_pool_2x2`: the 2x2, stride-2, 'valid' max pool of the reference
  models. XLA:CPU lowers the gradient of ``reduce_window`` max
  (``select_and_scatter``) to index arrays, an argmax reduce-window and a
  scatter: measured 359 ms for attempt 1's first pool (32x126x126x32) on the
  2-core EPYC, against 45 ms for this custom VJP, which compares each of the
  window's 4 inputs with the output and routes the gradient to the first one
  that equals it (row-major, as ``select_and_scatter`` with ``ge`` does, so
  ties on the zeros after a ReLU go where they went).

Tried and left out (numbers in benchmarks/README.md, "CPU fast path"; rerun
with ``python -m benchmarks.conv_kernel_gradient``): computing conv kernel
gradients as shifted matmuls instead of XLA's convolution over the batch. On
this project's 2-core EPYC it was faster for some layers alone but made the
whole ml1 and ml6 steps slower, so the convs stay XLA's.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

ENV = "IMGCLF_JAX_FAST_PATH"
SETTINGS = ("auto", "on", "off")


def enabled(setting: str = "auto", backend: str | None = None) -> bool:
    """Whether the fast path is used: the env var, then the config `setting`, then the backend.

    Args:
      setting: ``config.model.fast_path``: 'auto' (on for 'cpu'), 'on' or 'off'.
      backend: the jax backend name (default: ``jax.default_backend()``).

    Raises:
      ValueError: an unknown `setting` or value of ``IMGCLF_JAX_FAST_PATH``.
    """
    env = os.environ.get(ENV, "").strip().lower()
    if env:
        if env in ("0", "off", "false", "no"):
            return False
        if env in ("1", "on", "true", "yes"):
            return True
        raise ValueError(f"environment variable {ENV}={env!r}: expected 0 (off) or 1 (on)")
    if setting not in SETTINGS:
        raise ValueError(f"fast_path setting {setting!r}: expected one of {SETTINGS}")
    if setting != "auto":
        return setting == "on"
    return (backend or jax.default_backend()) == "cpu"


def _pool_windows(x: jax.Array) -> jax.Array:
    """float[B, H, W, C] -> [B, H//2, 2, W//2, 2, C]: the 2x2 windows (odd last row/column dropped)."""
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, 'valid' padding (= ``flax.linen.max_pool(x, (2, 2), (2, 2), 'VALID')``).

    Args:
      x: float[B, H, W, C].

    Returns:
      float[B, H // 2, W // 2, C].
    """
    return _pool_windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    x, y = residuals
    b, h, w, c = x.shape
    windows = _pool_windows(x)
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for row in (0, 1):
        for col in (0, 1):
            hit = (windows[:, :, row, :, col, :] == y) & ~taken  # the first maximum gets the gradient
            taken = taken | hit
            parts.append(jnp.where(hit, g, jnp.zeros_like(g)))
    hp, wp = h // 2, w // 2
    dx = jnp.stack(parts, axis=-1).reshape(b, hp, wp, c, 2, 2)
    dx = dx.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * hp, 2 * wp, c)
    return (jnp.pad(dx, ((0, 0), (0, h - 2 * hp), (0, w - 2 * wp), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
