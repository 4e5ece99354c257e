"""Where the time of imgclf_jax's train step goes: whole-step phases and every conv's three products.

Usage (from the repository root)::

  python -m benchmarks.profile_step [--model ml1] [--batch 32] [--image_size 128] [--repeats 5]

Prints JSON lines (``"benchmark": "profile_step"``), each with ``seconds`` (the
median per call) and, where FLOPs are defined, ``gflops`` and ``gflops_per_s``:

- ``"part": "step"`` rows, the whole model on a fixed batch of B images:
  ``forward`` (the training loss, dropout on), ``forward_backward`` (its
  gradient with respect to the params), ``optimizer`` (the optimizer update
  and its application) and ``train_step`` (:func:`imgclf_jax.steps.train_step`,
  all of it); jitted on one device, without buffer donation;
- ``"part": "conv"`` rows, per conv layer (``conv_0`` ..., ``side_conv``), each
  of ``op`` ``forward`` (``lax.conv_general_dilated`` in NHWC/HWIO, as
  ``flax.linen.Conv`` calls it), ``input_gradient`` and ``kernel_gradient``
  (``jax.vjp`` of that conv with respect to its input and to its kernel), at
  the layer's shapes in the model, bias and ReLU left out. The three cost the
  same FLOPs; ``needed`` is False for an input gradient no step computes
  (a conv on the images);
- ``"part": "dense"`` rows likewise for the dense layers (matmuls);
- ``"part": "pool"`` rows, per pooling layer (``pool_0`` ..., ``side_pool``):
  ``forward`` and ``gradient`` (``jax.vjp`` with respect to its input of the
  pool the model runs: :mod:`imgclf_jax.models.fast_path`'s when the fast path
  is on (``max_pool_2x2``, the pool and gradient routing that
  ``conv_relu_max_pool`` runs inside the conv block), else ``flax.linen.max_pool``
  / ``avg_pool``);
- ``"part": "trace"`` rows: the real train step under ``jax.profiler``, the
  20 slowest HLO ops with their kind of work (:mod:`benchmarks.trace_step`);
- a ``"part": "summary"`` row: the train step's seconds split into conv
  forward, conv input gradients (needed ones), conv kernel gradients, pooling
  forward, pooling gradients, dense, optimizer and the rest (ReLU, dropout,
  bias gradients, loss, and whatever XLA does differently inside the step),
  each also as a fraction of the step; the trace's shares per kind of work
  (``trace_share``); and the matmul probe for scale.

The isolated kernels are what XLA runs for them alone, each writing its
result to a fresh buffer (which costs milliseconds for the large activations
of the first layers); inside the step XLA fuses and lays them out otherwise,
so the parts need not add up (``rest`` can come out negative). The trace sees
the real step, but its events overlap across threads and the tracer slows the
step down: read its figures as shares, not as seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import sys
from typing import Any

from imgclf_jax import cli

from benchmarks import flops, machine, measure
from benchmarks.step_imgclf import synthetic_batch
from benchmarks.train_step import NUM_CLASSES, load_model_config

FLAGS = {"model": str, "batch": int, "image_size": int, "repeats": int, "matmul_size": int}


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One conv layer of the model at batch B: input float32[B, H, W, C_in] -> [B, H_out, W_out, C_out]."""

    name: str
    input_hwc: tuple[int, int, int]
    kernel: int
    out_channels: int
    padding: str  # 'SAME' or 'VALID'
    output_hw: tuple[int, int]
    needs_input_gradient: bool  # False for a conv applied to the images


def conv_shapes(model_config: Any, image_size: int, num_classes: int) -> list[ConvShape]:
    """The conv layers of ``create_model(model_config, num_classes)`` with their input and output shapes."""
    from imgclf_jax.models import layer_specs

    m = model_config
    kernels = {f"conv_{i}": (k, str(p).upper()) for i, (k, p)
               in enumerate(zip(m.conv_kernel_sizes, m.conv_paddings))}
    kernels["side_conv"] = (m.side_kernel_size, "SAME")
    image = (image_size, image_size, 3)
    shapes, previous = [], image
    for spec in layer_specs(m, image_size, num_classes):
        if spec.kind == "conv":
            source = image if spec.branch == "side" else previous
            k, padding = kernels[spec.name]
            shapes.append(ConvShape(spec.name, source, k, spec.output_shape[2], padding,
                                    spec.output_shape[:2], source is not image))
        if spec.branch == "main" and len(spec.output_shape) == 3:
            previous = spec.output_shape
    return shapes


def dense_shapes(model_config: Any, image_size: int, num_classes: int) -> list[tuple[str, int, int]]:
    """(name, input features, output units) of every dense layer, the output layer included."""
    from imgclf_jax.models import layer_specs

    shapes, features = [], None
    for spec in layer_specs(model_config, image_size, num_classes):
        if spec.kind == "dense":
            shapes.append((spec.name, features, spec.output_shape[0]))
        if len(spec.output_shape) == 1:
            features = spec.output_shape[0]
    return shapes


@dataclasses.dataclass(frozen=True)
class PoolShape:
    """One pooling layer at batch B: input float32[B, H, W, C], window = stride = `size`, 'VALID'."""

    name: str
    kind: str  # 'max_pool' or 'avg_pool'
    input_hwc: tuple[int, int, int]
    size: int


def pool_shapes(model_config: Any, image_size: int, num_classes: int) -> list[PoolShape]:
    """The pooling layers of the model with their input shapes (the conv output before each)."""
    from imgclf_jax.models import layer_specs

    shapes, previous = [], None
    for spec in layer_specs(model_config, image_size, num_classes):
        if spec.kind in ("max_pool", "avg_pool"):
            size = 2 if spec.kind == "max_pool" else int(model_config.side_pool_size)
            shapes.append(PoolShape(spec.name, spec.kind, previous, size))
        if len(spec.output_shape) == 3:
            previous = spec.output_shape
    return shapes


def _row(part: str, name: str, op: str, timing: dict, flop_count: int | None, **extra) -> dict:
    row = {"benchmark": "profile_step", "part": part, "layer": name, "op": op, **extra,
           "seconds": timing["seconds"], "seconds_min": timing["seconds_min"]}
    if flop_count:
        row["gflops"] = flop_count / 1e9
        row["gflops_per_s"] = flop_count / 1e9 / timing["seconds"]
    return row


def profile_convs(shapes: list[ConvShape], batch: int, repeats: int) -> list[dict]:
    """Times forward, input gradient and kernel gradient of each conv at batch `batch`."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    rows = []
    for s in shapes:
        h, w, c = s.input_hwc
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.uniform(kx, (batch, h, w, c), jnp.float32)
        kernel = jax.random.normal(kw, (s.kernel, s.kernel, c, s.out_channels), jnp.float32) * 0.05
        g = jax.random.normal(kg, (batch, *s.output_hw, s.out_channels), jnp.float32)
        conv = functools.partial(lax.conv_general_dilated, window_strides=(1, 1), padding=s.padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
        ops = {
            "forward": jax.jit(lambda x, k, g: conv(x, k)),
            "input_gradient": jax.jit(lambda x, k, g: jax.vjp(lambda x_: conv(x_, k), x)[1](g)[0]),
            "kernel_gradient": jax.jit(lambda x, k, g: jax.vjp(lambda k_: conv(x, k_), k)[1](g)[0]),
        }
        count = flops.conv_flops(batch, *s.output_hw, s.kernel, c, s.out_channels)
        shape = {"input": [batch, h, w, c], "kernel": [s.kernel, s.kernel, c, s.out_channels],
                 "output": [batch, *s.output_hw, s.out_channels], "padding": s.padding}
        for op, fn in ops.items():
            timing = measure.seconds_per_call(lambda: fn(x, kernel, g).block_until_ready(), repeats)
            needed = s.needs_input_gradient if op == "input_gradient" else True
            rows.append(_row("conv", s.name, op, timing, count, shape=shape, needed=needed))
    return rows


def profile_pools(shapes: list[PoolShape], batch: int, repeats: int, fast: bool = False) -> list[dict]:
    """Times forward and input gradient of each pooling layer at batch `batch` (no FLOPs counted).

    `fast`: time the pools the model runs with its CPU fast path
    (:mod:`imgclf_jax.models.fast_path`) instead of flax's.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from imgclf_jax.models import fast_path

    rows = []
    for s in shapes:
        if fast and s.kind == "max_pool":
            pool = fast_path.max_pool_2x2
        elif fast:
            pool = functools.partial(fast_path.avg_pool, size=s.size)
        else:
            pool = functools.partial(nn.max_pool if s.kind == "max_pool" else nn.avg_pool,
                                     window_shape=(s.size, s.size), strides=(s.size, s.size), padding="VALID")
        x = jax.random.uniform(jax.random.key(0), (batch, *s.input_hwc), jnp.float32)
        g = jnp.ones_like(pool(x))
        ops = {"forward": jax.jit(lambda x, g: pool(x)),
               "gradient": jax.jit(lambda x, g: jax.vjp(pool, x)[1](g)[0])}
        for op, fn in ops.items():
            timing = measure.seconds_per_call(lambda: fn(x, g).block_until_ready(), repeats)
            rows.append(_row("pool", s.name, op, timing, None, kind=s.kind, input=[batch, *s.input_hwc],
                             size=s.size))
    return rows


def profile_dense(shapes: list[tuple[str, int, int]], batch: int, repeats: int) -> list[dict]:
    """Times forward (x @ w), input gradient (g @ w.T) and kernel gradient (x.T @ g) of each dense layer."""
    import jax
    import jax.numpy as jnp

    rows = []
    for name, n, m in shapes:
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.uniform(kx, (batch, n), jnp.float32)
        w = jax.random.normal(kw, (n, m), jnp.float32)
        g = jax.random.normal(kg, (batch, m), jnp.float32)
        ops = {"forward": jax.jit(lambda x, w, g: x @ w), "input_gradient": jax.jit(lambda x, w, g: g @ w.T),
               "kernel_gradient": jax.jit(lambda x, w, g: x.T @ g)}
        for op, fn in ops.items():
            timing = measure.seconds_per_call(lambda: fn(x, w, g).block_until_ready(), repeats)
            rows.append(_row("dense", name, op, timing, 2 * batch * n * m, shape=[batch, n, m]))
    return rows


def profile_phases(config: Any, batch: int, image_size: int, repeats: int) -> list[dict]:
    """Times the whole model's forward, forward+backward, optimizer update and train step on one device."""
    import jax
    import optax

    from imgclf_jax import steps
    from imgclf_jax.losses import softmax_cross_entropy
    from imgclf_jax.models import create_model, l2_penalty
    from imgclf_jax.optim import create_optimizer_for_shapes

    model = create_model(config.model, NUM_CLASSES)
    tx = create_optimizer_for_shapes(config.optimizer, config.train.num_epochs)
    l2 = config.model.l2
    state = steps.create_train_state(model, tx, jax.random.key(config.seed), image_size)
    data = jax.device_put(synthetic_batch(batch, image_size, NUM_CLASSES))
    key = jax.random.key(1)

    def loss(params, data):
        logits = model.apply({"params": params}, data["image"], train=True, rngs={"dropout": key})
        return softmax_cross_entropy(logits, data["label"], data["mask"]) + l2_penalty(params, l2)

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    forward, forward_backward = jax.jit(loss), jax.jit(jax.grad(loss))
    grads = forward_backward(state.params, data)
    update = jax.jit(update)
    train_step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=l2))
    train_flops = batch * flops.train_flops_per_image(config.model, image_size, NUM_CLASSES)
    forward_flops = batch * flops.forward_flops_per_image(config.model, image_size, NUM_CLASSES)
    calls = {
        "forward": (lambda: forward(state.params, data).block_until_ready(), forward_flops),
        "forward_backward": (lambda: jax.block_until_ready(forward_backward(state.params, data)),
                             train_flops),
        "optimizer": (lambda: jax.block_until_ready(update(grads, state.opt_state, state.params)), None),
        "train_step": (lambda: jax.block_until_ready(train_step(state, data, key)), train_flops),
    }
    return [_row("step", "model", op, measure.seconds_per_call(call, repeats), count)
            for op, (call, count) in calls.items()]


def profile_trace(config: Any, batch: int, image_size: int, top: int = 20) -> list[dict]:
    """The `top` slowest HLO ops of the real train step under the profiler, and one row of shares per kind."""
    import jax

    from benchmarks import trace_step
    from imgclf_jax import steps
    from imgclf_jax.models import create_model
    from imgclf_jax.optim import create_optimizer_for_shapes

    model = create_model(config.model, NUM_CLASSES)
    tx = create_optimizer_for_shapes(config.optimizer, config.train.num_epochs)
    state = steps.create_train_state(model, tx, jax.random.key(config.seed), image_size)
    data = jax.device_put(synthetic_batch(batch, image_size, NUM_CLASSES))
    key = jax.random.key(1)
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, l2=config.model.l2))
    compiled = step.lower(state, data, key).compile()
    ops = trace_step.trace_ops(lambda: jax.block_until_ready(compiled(state, data, key)), compiled.as_text())
    total = sum(op["seconds_per_step"] for op in ops) or 1.0
    shares = collections.Counter()
    for op in ops:
        shares[op["category"]] += op["seconds_per_step"] / total
    rows = [{"benchmark": "profile_step", "part": "trace", **op, "share": op["seconds_per_step"] / total}
            for op in ops[:top]]
    return rows + [{"benchmark": "profile_step", "part": "trace_share", "share": dict(shares.most_common())}]


def summarize(rows: list[dict], machine_gflops: float) -> dict:
    """The summary row: the train step's seconds split by kind of work, and each kind's share of it."""
    step = {r["op"]: r["seconds"] for r in rows if r["part"] == "step"}
    total = step["train_step"]

    def seconds(part, op):
        return sum(r["seconds"] for r in rows
                   if r["part"] == part and r["op"] == op and r.get("needed", True))

    parts = {
        "conv_forward": seconds("conv", "forward"),
        "conv_input_gradient": seconds("conv", "input_gradient"),
        "conv_kernel_gradient": seconds("conv", "kernel_gradient"),
        "pool_forward": seconds("pool", "forward"),
        "pool_gradient": seconds("pool", "gradient"),
        "dense": sum(seconds("dense", op) for op in ("forward", "input_gradient", "kernel_gradient")),
        "optimizer": step["optimizer"],
    }
    parts["rest"] = total - sum(parts.values())
    return {"benchmark": "profile_step", "part": "summary", "train_step_seconds": total,
            "forward_seconds": step["forward"],
            "backward_seconds": step["forward_backward"] - step["forward"],
            "seconds": parts, "fraction_of_step": {k: v / total for k, v in parts.items()},
            "trace_share": next((r["share"] for r in rows if r["part"] == "trace_share"), None),
            "machine_gflops_per_s": machine_gflops}


def main(argv: list[str]) -> int:
    """Runs the profile on command-line words `argv` (see the module docstring); returns the exit status."""
    values, _ = cli.parse_flags(argv, FLAGS, config_overrides=False)
    model = values["model"] or "ml1"
    config = load_model_config(model)
    if config.model.name != "branched_cnn":
        from imgclf_jax.errors import ConfigError

        raise ConfigError(f"profile_step profiles the branched CNN's parts (its conv layers and fast path); "
                          f"{model!r} is model.name={config.model.name!r}: time it with python -m "
                          "benchmarks.train_step instead")
    from imgclf_jax import backend

    backend.configure_xla(config.model.fast_path)  # profile what training runs (IMGCLF_JAX_FAST_PATH=0: XLA's)
    batch = values["batch"] or 32
    image_size = values["image_size"] or config.data.image_size
    repeats = values["repeats"] or 5
    probe = {"benchmark": "machine", **machine.describe(), **machine.matmul_gflops(values["matmul_size"])}
    print(json.dumps(probe), flush=True)
    common = {"model": model, "batch": batch, "image_size": image_size}
    rows = []
    convs = conv_shapes(config.model, image_size, NUM_CLASSES)
    for what, run in (
        ("whole step", lambda: profile_phases(config, batch, image_size, repeats)),
        ("convs", lambda: profile_convs(convs, batch, repeats)),
        ("pooling", lambda: profile_pools(pool_shapes(config.model, image_size, NUM_CLASSES),
                                          batch, repeats, fast=backend.enabled(config.model.fast_path))),
        ("dense layers", lambda: profile_dense(dense_shapes(config.model, image_size, NUM_CLASSES),
                                               batch, repeats)),
        ("profiler trace of the step", lambda: profile_trace(config, batch, image_size)),
    ):
        print(f"profile_step: {model}: {what} ...", file=sys.stderr, flush=True)
        for row in run():
            rows.append(row)
            print(json.dumps({**common, **row}), flush=True)
    print(json.dumps({**common, **summarize(rows, probe["matmul_gflops_per_s"])}), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.profile_step")
