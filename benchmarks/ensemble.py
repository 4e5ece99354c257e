"""K members in one compiled step, per mapping mode, against K separate steps.

Usage (from the repository root)::

  python -m benchmarks.ensemble [--model ml1] [--members 1,2,4,8] [--mappings vmap,unroll,map]
      [--batch 32] [--image_size 128] [--repeats 3] [--max_step_seconds 60]

Prints one JSON line per (K, mapping)::

  {"benchmark": "ensemble", "model": "ml1", "members": K, "mapping": "unroll",
   "member_images_per_s": K x batch / s per ensemble step (median of repeats),
   "separate_member_images_per_s": K x batch / s for K plain steps run one after another,
   "speedup": ensemble / separate, "compile_seconds": s, "backend": "cpu", ...}

Both sides run the real steps of training: :func:`imgclf_jax.ensemble.steps.jit_train_step`
(own batches per member, ``float32[K, B, S, S, 3]``) and :func:`imgclf_jax.steps.jit_train_step`
on the same device mesh, on fixed synthetic batches, side by side in one process.
A mode whose first (compiling) step takes longer than ``--max_step_seconds``
gives a row with ``"skipped"`` (lax.map on CPU is ~25x slower at K=2).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError

FLAGS = {"model": str, "members": str, "mappings": str, "batch": int, "image_size": int, "repeats": int,
         "max_step_seconds": float}


def run(model_name: str, members: list[int], mappings: list[str], batch: int, image_size: int, repeats: int,
        max_step_seconds: float) -> list[dict]:
    """Measures every (K, mapping); returns the rows (also printed as they come)."""
    import jax

    from benchmarks import measure
    from benchmarks.step_imgclf import synthetic_batch
    from benchmarks.train_step import load_model_config
    from imgclf_jax import parallel, steps
    from imgclf_jax.ensemble import steps as ens_steps
    from imgclf_jax.models import create_model
    from imgclf_jax.optim import create_optimizer_for_shapes

    config = load_model_config(model_name)
    model = create_model(config.model, 5)
    tx = create_optimizer_for_shapes(config.optimizer, config.train.num_epochs)
    mesh = parallel.make_mesh(batch)
    rep = parallel.replicated(mesh)
    single_step = steps.jit_train_step(model, tx, config.model.l2, mesh)
    rows = []
    for k in members:
        init_keys, dropout_keys = ens_steps.member_keys(0, k)
        dropout_keys = jax.device_put(dropout_keys, rep)
        # K plain steps, one after another (what K separate runs do), on K states.
        single_states = [jax.device_put(steps.create_train_state(model, tx, init_keys[i], image_size), rep)
                         for i in range(k)]
        member_batches = [synthetic_batch(batch, image_size, 5, seed=i) for i in range(k)]
        single_batch = parallel.shard_batch(member_batches[0], mesh)

        def separate():
            for i in range(k):
                single_states[i], _ = single_step(single_states[i], single_batch, dropout_keys[i])
            jax.block_until_ready(single_states)

        separate_s = measure.seconds_per_call(separate, repeats=repeats, target_seconds=0.0)["seconds"]
        stacked = parallel.shard_batch({key: np.stack([b[key] for b in member_batches])
                                        for key in member_batches[0]}, mesh, members=True)
        for mode in mappings:
            row = {"benchmark": "ensemble", "model": model_name, "members": k, "mapping": mode, "batch": batch,
                   "image_size": image_size, "backend": jax.default_backend(), "devices": mesh.size,
                   "separate_member_images_per_s": k * batch / separate_s}
            step = ens_steps.jit_train_step(model, tx, config.model.l2, mesh, mode, shared_data=False)
            state = [jax.jit(lambda keys: ens_steps.create_ensemble_state(model, tx, keys, image_size),
                             out_shardings=rep)(init_keys)]
            start = time.perf_counter()
            state[0], _ = step(state[0], stacked, dropout_keys)
            jax.block_until_ready(state[0])
            row["compile_seconds"] = time.perf_counter() - start
            if row["compile_seconds"] > max_step_seconds:
                row["skipped"] = f"first step took {row['compile_seconds']:.0f} s > --max_step_seconds"
            else:
                def one():
                    state[0], _ = step(state[0], stacked, dropout_keys)
                    jax.block_until_ready(state[0])

                seconds = measure.seconds_per_call(one, repeats=repeats, target_seconds=0.0)["seconds"]
                row["member_images_per_s"] = k * batch / seconds
                row["speedup"] = row["member_images_per_s"] / row["separate_member_images_per_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
            del state
    return rows


def main(argv: list[str]) -> int:
    """Runs the benchmark on command-line words `argv` (see the module docstring); returns the exit status."""
    values, _ = cli.parse_flags(argv, FLAGS, config_overrides=False)
    from imgclf_jax import backend

    backend.configure_xla()  # the XLA setting training uses (IMGCLF_JAX_FAST_PATH=0: jaxlib's default)
    members = [int(m) for m in (values["members"] or "1,2,4,8").split(",")]
    mappings = (values["mappings"] or "vmap,unroll,map").split(",")
    for mode in mappings:
        if mode not in ("vmap", "unroll", "map"):
            raise ConfigError(f"--mappings: unknown mode {mode!r} (vmap, unroll, map)")
    if any(m < 1 for m in members):
        raise ConfigError("--members: every K must be >= 1")
    run(values["model"] or "ml1", members, mappings, values["batch"] or 32, values["image_size"] or 128,
        values["repeats"] or 3, values["max_step_seconds"] or 60.0)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.ensemble")
