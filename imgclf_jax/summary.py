"""Print a config's model: a layer table, the parameter count and the forward FLOPs per image.

Usage::

  python -m imgclf_jax.summary --config configs/ml6.py [--num_classes 5] [--config.KEY=VALUE ...]

The number of classes comes from the data at training time and is not in the
config; here it is ``--num_classes`` (default 10 for ``data.builder='digits'``,
else 5, the reference competition). The input is ``data.image_size`` squared,
RGB. Nothing is initialized or run: shapes come from ``jax.eval_shape``, so
even the 70M-parameter models print in seconds on a CPU (the step is compiled
for the memory figures, never run).

Prints the table (layer, branch, per-image output shape, parameters, forward
MFLOPs), the memory one member's training needs at ``train.batch_size`` on
one device (params, optimizer state, and the train step's temporaries:
activations kept for the backward pass, gradients, workspace; from XLA's
``memory_analysis`` of the compiled step, see :mod:`imgclf_jax.memory`), the
total for ``ensemble.num_members`` members, and, as the last line, one JSON
object::

  {"num_params": N, "num_state": S, "flops_per_image": F, "flops_convention": "...",
   "memory_per_member_bytes": {"params": .., "opt_state": .., "model_state": .., "ema": .., "temp": ..,
                               "batch": .., "total": ..},
   "num_members": K, "memory_need_bytes": M}

FLOPs are counted analytically (:func:`count_flops`): 2 per multiply-add of the
conv and dense layers; bias adds, ReLU, pooling, dropout, concatenation,
BatchNorm and residual adds are not counted. ``num_state`` counts the model's
non-trainable values (BatchNorm's running mean and variance; 0 for the branched
CNN), which are not in ``num_params``.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from imgclf_jax import cli, models
from imgclf_jax.errors import ConfigError

FLOPS_CONVENTION = (
    "forward pass, one image: 2 FLOPs per multiply-add of the conv and dense layers; "
    "bias adds, ReLU, pooling, dropout, concatenation, BatchNorm and residual adds not counted"
)


def count_flops(model_config: Any, image_size: int, num_classes: int) -> int:
    """Forward FLOPs per image of ``create_model(model_config, num_classes)`` on image_size^2 x 3 input.

    2 FLOPs per multiply-add: a conv with output H x W x C_out and a k x k x C_in
    kernel counts 2 * H * W * k * k * C_in * C_out; a dense layer N -> M counts
    2 * N * M. Everything else counts 0 (see :data:`FLOPS_CONVENTION`). The multiply-adds are the
    model's own (:func:`imgclf_jax.models.layer_specs`, by ``model.name``).
    """
    return 2 * sum(row.macs for row in models.layer_specs(model_config, image_size, num_classes))


def _variables_shape(model: nn.Module, image_size: int) -> Any:
    """The shapes of ``model.init``'s variables on one image_size^2 x 3 image (``jax.eval_shape``, no init)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


def _counts_by_layer(tree: Any) -> dict[str, int]:
    """``{layer path: values}``: a layer is the dict that holds arrays; nested ones join with '/'."""
    counts: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        name = "/".join(path[:-1])
        counts[name] = counts.get(name, 0) + math.prod(leaf.shape)
    return counts


def param_counts(model: nn.Module, image_size: int) -> dict[str, int]:
    """``{layer name: parameter count}`` of the real module, from ``jax.eval_shape`` (no init).

    A layer inside a submodule is named by its path (``stage0_block0/conv1``), as in
    :class:`imgclf_jax.models.LayerSpec`.
    """
    return _counts_by_layer(flax.core.unfreeze(_variables_shape(model, image_size)["params"]))


def state_counts(model: nn.Module, image_size: int) -> dict[str, int]:
    """``{collection: values}`` of the real module's non-param variables (BatchNorm's ``batch_stats``:
    running mean and variance, 2 per channel); {} for a model without any."""
    variables = flax.core.unfreeze(_variables_shape(model, image_size))
    return {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
            for name, tree in variables.items() if name != "params"}


def output_shape(model: nn.Module, image_size: int, batch: int = 1) -> tuple[int, ...]:
    """The real module's logits shape on ``float32[batch, image_size, image_size, 3]``."""
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)

    def forward(key, x):
        variables = model.init(key, x, train=False)
        return model.apply(variables, x, train=False)

    return tuple(jax.eval_shape(forward, jax.random.key(0), images).shape)


def format_table(rows: list[models.LayerSpec]) -> str:
    """A plain-text table of `rows`: layer, branch, output shape, params, forward MFLOPs."""
    header = ("layer", "branch", "output shape", "params", "MFLOPs")
    body = [(r.name, r.branch, "x".join(str(d) for d in r.output_shape),
             f"{r.params:,}" if r.params else "-", f"{2 * r.macs / 1e6:,.2f}" if r.macs else "-")
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    align = ["<", "<", ">", ">", ">"]

    def fmt(line):
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body), rule])


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    args = cli.parse_args(argv, {"num_classes": int}, workdir=False)
    config = args.config
    num_classes = args.extras["num_classes"]
    if num_classes is None:
        num_classes = 10 if config.data.builder == "digits" else 5
    if num_classes < 1:
        raise ConfigError(f"flag --num_classes must be >= 1, got {num_classes}")
    size = config.data.image_size
    rows = models.layer_specs(config.model, size, num_classes)  # the entry of model.name
    model = models.create_model(config.model, num_classes)

    # The table is analytic; check it against the real module so it cannot drift.
    real = param_counts(model, size)
    analytic = {r.name: r.params for r in rows if r.params}
    if real != analytic:
        raise RuntimeError(f"layer_specs disagrees with the module: {analytic} != {real}")
    logits = output_shape(model, size)
    if logits != (1, num_classes):
        raise RuntimeError(f"unexpected logits shape {logits}")

    num_params = sum(real.values())
    state = state_counts(model, size)  # e.g. BatchNorm's running statistics: not trained, not in num_params
    num_state = sum(state.values())
    flops = count_flops(config.model, size, num_classes)
    print(f"{args.config_path}: model '{models.model_entry(config.model).name}', input {size}x{size}x3, "
          f"{num_classes} classes, logits {list(logits)}")
    print(format_table(rows))
    extra = (f" (+ {num_state:,} non-trainable values: {', '.join(state)})" if num_state else "")
    print(f"total: {num_params:,} parameters, {flops / 1e6:,.2f} MFLOPs per image (forward){extra}")

    from imgclf_jax import memory
    from imgclf_jax.optim import create_optimizer_for_shapes

    tx = create_optimizer_for_shapes(config.optimizer, config.train.num_epochs)  # no data: state shapes only
    batch = config.train.batch_size
    member = memory.member_memory(model, tx, config.model.l2, size, batch, config.train.ema_decay)
    from imgclf_jax.ensemble import population

    k = population.population_size(config)
    keeps_best = bool(config.train.early_stopping.monitor)
    need = memory.ensemble_need_bytes(member, k, keeps_best)
    mib = 2.0**20
    print(f"memory per member, batch {batch} on one device: params {member.params / mib:,.1f} MiB, "
          + (f"model state (BatchNorm statistics) {member.model_state / mib:,.2f} MiB, " if member.model_state
             else "")
          + (f"EMA weights {member.ema / mib:,.2f} MiB, " if member.ema else "") +
          f"optimizer state {member.opt_state / mib:,.1f} MiB, step temporaries {member.temp / mib:,.1f} MiB"
          f"{f', best-weights copy {(member.params + member.model_state) / mib:,.1f} MiB' if keeps_best else ''}; "
          f"{k} member{'s' if k > 1 else ''}: {need / mib:,.1f} MiB")
    print(json.dumps({"num_params": num_params, "num_state": num_state, "flops_per_image": flops,
                      "flops_convention": FLOPS_CONVENTION, "memory_per_member_bytes": member.as_dict(),
                      "num_members": k, "memory_need_bytes": need}))
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.summary")
