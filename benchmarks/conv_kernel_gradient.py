"""Conv kernel gradients: XLA's against hand-written matmul forms, per conv layer of the reference models.

Usage (from the repository root)::

  python -m benchmarks.conv_kernel_gradient [--models ml1,ml6] [--batch 32] [--repeats 3]

Prints one JSON line per (model, conv layer, method)::

  {"benchmark": "conv_kernel_gradient", "model": "ml6", "layer": "conv_1", "input_shape": [128, 128, 32],
   "kernel": 5, "padding": "SAME", "out_channels": 70, "method": "rows", "seconds": s,
   "gflops_per_s": G, "speedup_vs_xla": x, "max_rel_error": e}

Methods, all computing ``dK[i, j, c, o] = sum_{b,h,w} xpad[b, h+i, w+j, c] g[b, h, w, o]``:

- ``xla``: ``jax.vjp`` of ``lax.conv_general_dilated`` with respect to the kernel (what training runs);
- ``shift``: one matmul per kernel tap (k*k products of ``[B*H*W, C_in]^T [B*H*W, C_out]``);
- ``rows``: one matmul per kernel row (the row's k shifts concatenated on channels);
- ``patches``: one matmul over ``lax.conv_general_dilated_patches`` (k*k times the input in memory).

This is the experiment behind leaving the conv gradients to XLA in
:mod:`imgclf_jax.models.fast_path` (benchmarks/README.md, "CPU fast path").
"""

from __future__ import annotations

import json

import numpy as np

from imgclf_jax import cli

FLAGS = {"models": str, "batch": int, "repeats": int}
DN = ("NHWC", "HWIO", "NHWC")
METHODS = ("xla", "shift", "rows", "patches")


def kernel_gradient(method: str, x, g, k: int, padding: str):
    """float32[k, k, C_in, C_out] kernel gradient of a stride-1 conv by `method` (see the module docstring).

    Args:
      x: float32[B, H, W, C_in], the conv's input; g: float32[B, H_out, W_out, C_out], its output's gradient.
    """
    import jax
    import jax.numpy as jnp

    cin, cout = x.shape[-1], g.shape[-1]
    _, ho, wo, _ = g.shape
    if method == "xla":
        def conv(kernel):
            return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=DN)

        return jax.vjp(conv, jnp.zeros((k, k, cin, cout), x.dtype))[1](g)[0]
    if method == "patches":
        p = jax.lax.conv_general_dilated_patches(x, (k, k), (1, 1), padding, dimension_numbers=DN)
        return jnp.einsum("bhwp,bhwo->po", p, g).reshape(cin, k, k, cout).transpose(1, 2, 0, 3)
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (1, 1), padding)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    if method == "shift":
        return jnp.stack([jnp.stack([jnp.einsum("bhwc,bhwo->co", xp[:, i:i + ho, j:j + wo, :], g)
                                     for j in range(k)]) for i in range(k)])
    if method == "rows":
        rows = []
        for i in range(k):
            shifted = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for j in range(k)], axis=-1)
            rows.append(jnp.einsum("bhwc,bhwo->co", shifted, g).reshape(k, cin, cout))
        return jnp.stack(rows)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def main(argv: list[str]) -> int:
    """Runs the benchmark on command-line words `argv` (see the module docstring); returns the exit status."""
    import jax

    from benchmarks import measure
    from benchmarks.profile_step import conv_shapes
    from benchmarks.train_step import load_model_config

    values, _ = cli.parse_flags(argv, FLAGS, config_overrides=False)
    from imgclf_jax import backend

    backend.configure_xla()  # the XLA setting training uses (IMGCLF_JAX_FAST_PATH=0: jaxlib's default)
    batch, repeats = values["batch"] or 32, values["repeats"] or 3
    for model in (values["models"] or "ml1,ml6").split(","):
        config = load_model_config(model)
        for layer in conv_shapes(config.model, config.data.image_size, 5):
            h, w, cin = layer.input_hwc
            k, padding, cout = layer.kernel, layer.padding, layer.out_channels
            x = jax.random.normal(jax.random.key(0), (batch, h, w, cin))
            kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=DN)
            g = jax.random.normal(jax.random.key(2), y.shape)
            flops = 2.0 * np.prod(y.shape) * k * k * cin
            reference, xla_seconds = None, None
            for method in METHODS:
                fn = jax.jit(lambda x, g, method=method: kernel_gradient(method, x, g, k, padding))
                result = np.asarray(fn(x, g))
                reference = result if reference is None else reference
                seconds = measure.seconds_per_call(lambda: fn(x, g).block_until_ready(), repeats=repeats,
                                                   target_seconds=0.0)["seconds"]
                xla_seconds = xla_seconds or seconds
                print(json.dumps({
                    "benchmark": "conv_kernel_gradient", "model": model, "layer": layer.name,
                    "input_shape": list(layer.input_hwc), "kernel": k, "padding": padding, "out_channels": cout,
                    "batch": batch,
                    "method": method, "seconds": seconds, "gflops_per_s": flops / seconds / 1e9,
                    "speedup_vs_xla": xla_seconds / seconds,
                    "max_rel_error": float(np.max(np.abs(result - reference)) / np.max(np.abs(reference))),
                }), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.conv_kernel_gradient")
