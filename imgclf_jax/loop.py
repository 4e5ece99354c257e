"""The run: data -> mesh -> state -> resume -> epochs (train, validate, checkpoint) -> result -> reports.

One call of :func:`train_and_evaluate` trains a config in a workdir. It resumes
from the latest checkpoint when the workdir holds an unfinished run of the same
config (``train.num_epochs`` and ``data.num_workers`` aside), refuses a
different config unless ``overwrite``, and, whatever happens, leaves complete
files behind: checkpoints and JSON files are written atomically after each
epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from imgclf_jax import checkpoint as ckpt_lib
from imgclf_jax import parallel, report, steps
from imgclf_jax.data import pipeline, splits
from imgclf_jax.early_stopping import EarlyStopping
from imgclf_jax.errors import ConfigError, UserError
from imgclf_jax.models import create_model
from imgclf_jax.optim import create_optimizer

# Keys that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = ("train.num_epochs", "data.num_workers")


class TrainingError(UserError):
    """Training cannot go on (a NaN or infinite loss)."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def check_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Refuses to reuse a workdir that holds a run of another config (unless `overwrite`: then clears it).

    Raises:
      ConfigError: the workdir's config.json differs in keys other than RESUMABLE_CHANGES.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir '{workdir}' is a file, not a folder")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    if overwrite:
        print(f"--overwrite: removing the previous run in {workdir}")
        shutil.rmtree(workdir)
        return
    with open(path) as f:
        old = _flat(json.load(f))
    new = _flat(json.loads(json.dumps(config.to_dict())))
    differing = sorted(k for k in set(old) | set(new)
                       if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if differing:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differing)
        raise ConfigError(
            f"workdir '{workdir}' holds a run with another config: {shown}; "
            "use another --workdir, or --overwrite to replace it"
        )


@dataclasses.dataclass
class Evaluation:
    """Validation (or test) results over one split: mean loss, accuracy, probabilities float32[N, K]."""

    loss: float
    accuracy: float
    probabilities: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=-1)


def evaluate(eval_step, params, split: splits.Split, config, mesh) -> Evaluation:
    """Runs `eval_step` over every row of `split` (in order, padded batches masked out)."""
    totals = None
    probabilities = []
    for batch in pipeline.iterate(pipeline.eval_dataset(split, config), config.data.num_workers):
        metrics, probs = eval_step(params, parallel.shard_batch(batch, mesh))
        totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        probabilities.append(np.asarray(probs)[batch["mask"]])
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return Evaluation(loss=float(totals["loss_sum"]) / count, accuracy=float(totals["correct"]) / count,
                      probabilities=np.concatenate(probabilities))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> dict:
    """Trains `config` in `workdir` and writes every output; returns the summary dict.

    Raises:
      ConfigError, DataError: bad config or data (before any training step).
      TrainingError: a NaN or infinite training loss (the checkpoints stay intact).
    """
    check_workdir(workdir, config, overwrite)
    data = splits.load_run_data(config.data)
    os.makedirs(workdir, exist_ok=True)
    report.write_json(os.path.join(workdir, "config.json"), config.to_dict())

    model = create_model(config.model, data.num_classes)
    tx, schedule = create_optimizer(config.optimizer)
    mesh = parallel.make_mesh(config.train.batch_size)
    rep = parallel.replicated(mesh)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    train_step = steps.jit_train_step(model, tx, config.model.l2, mesh)
    eval_step = steps.jit_eval_step(model, config.model.l2, mesh)
    train = pipeline.train_pipeline(data.train, config)

    stopper = EarlyStopping(config.train.early_stopping.monitor, config.train.early_stopping.patience)
    checkpoints = ckpt_lib.RunCheckpoints(workdir)
    make_state = jax.jit(lambda key: steps.create_train_state(model, tx, key, config.data.image_size),
                         out_shardings=rep)
    history: list[dict] = []
    timing = {"train_seconds": 0.0, "train_images": 0}
    best_params = None
    start_epoch = checkpoints.latest_epoch() or 0
    if start_epoch:
        abstract = ckpt_lib.abstract_like(jax.eval_shape(make_state, init_key), rep)
        state, best_params, loop_state = checkpoints.restore_latest(
            abstract, abstract.params if stopper.restores_best else None)
        history, timing = loop_state["history"], loop_state["timing"]
        stopper = EarlyStopping.from_state_dict(loop_state["early_stopping"])
        if stopper.stopped or start_epoch >= config.train.num_epochs:
            print(f"{workdir} holds a finished run ({start_epoch} epochs); writing its reports again")
        else:
            print(f"resuming {workdir} after epoch {start_epoch}")
    else:
        state = make_state(init_key)
    num_params = count_params(state.params)

    for epoch in range(start_epoch, config.train.num_epochs):
        if stopper.stopped:
            break
        started = time.perf_counter()
        totals = None
        steady_start, steady_images = None, 0
        bar = tqdm(total=train.epoch_size, unit="img", desc=f"epoch {epoch + 1}/{config.train.num_epochs}",
                   dynamic_ncols=True, mininterval=1.0)
        for i, batch in enumerate(train.epoch(epoch)):
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh), dropout_key)
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
            real = int(batch["mask"].sum())
            if i == 0:
                jax.block_until_ready(state.step)  # compilation and warm-up stay out of the timing
                steady_start = time.perf_counter()
            else:
                steady_images += real
            bar.update(real)
        jax.block_until_ready(state.step)
        if steady_images:
            timing["train_seconds"] += time.perf_counter() - steady_start
            timing["train_images"] += steady_images
        totals = jax.device_get(totals)
        train_loss = float(totals["loss_sum"]) / float(totals["count"])
        if not np.isfinite(train_loss):
            bar.close()
            raise TrainingError(
                f"training loss is {train_loss} in epoch {epoch + 1} (steps up to {int(state.step)}); "
                f"the checkpoints of the last good epoch are in {workdir}/checkpoints"
            )
        val = evaluate(eval_step, state.params, data.validation, config, mesh)
        entry = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": float(totals["correct"]) / float(totals["count"]),
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "learning_rate": float(f"{float(schedule(int(state.step))):.7g}"),  # float32 value, no noise
            "seconds": time.perf_counter() - started,
        }
        bar.set_postfix(loss=f"{entry['train_loss']:.4f}", acc=f"{entry['train_accuracy']:.4f}",
                        val_loss=f"{val.loss:.4f}", val_acc=f"{val.accuracy:.4f}")
        bar.close()
        history.append(entry)
        if stopper.update(epoch, entry) and stopper.restores_best:
            best_params = jax.tree.map(jnp.copy, state.params)
        checkpoints.save_latest(epoch + 1, state, best_params if stopper.restores_best else None, {
            "history": history, "early_stopping": stopper.state_dict(), "timing": timing})
        report.write_json(os.path.join(workdir, "history.json"), history)

    result_params = best_params if (stopper.restores_best and best_params is not None) else state.params
    summary = finish(config, workdir, data, result_params, history, stopper, timing, num_params,
                     checkpoints, eval_step, mesh)
    checkpoints.close()
    return summary


def finish(config, workdir, data, params, history, stopper, timing, num_params, checkpoints,
           eval_step, mesh) -> dict:
    """Saves the result checkpoint and writes the confusion matrix, curves, submission and summary."""
    checkpoints.save_result(params, {
        "class_names": data.class_names,
        "num_classes": data.num_classes,
        "config": config.to_dict(),
    })
    val = evaluate(eval_step, params, data.validation, config, mesh)
    matrix = report.confusion_matrix(data.validation.labels, val.predictions, data.num_classes)
    report.save_confusion_matrix(matrix, data.class_names, workdir,
                                 f"validation, result weights: accuracy {val.accuracy:.4f}")
    report.plot_curves(history, workdir)
    if data.test is not None:
        test = evaluate(eval_step, params, data.test, config, mesh)
        report.write_submission(os.path.join(workdir, "submission.csv"), data.test.image_ids,
                                test.predictions)
    best = history[stopper.best_epoch]
    summary = {
        "num_params": num_params,
        "epochs_run": len(history),
        "stopped_early": stopper.stopped,
        "best_metric": stopper.tracked,  # the monitor, or val_accuracy without early stopping
        "best_epoch": best["epoch"],  # 1-based; ties go to the earlier epoch (Keras)
        "best_val_accuracy": best["val_accuracy"],  # at best_epoch
        "best_val_loss": best["val_loss"],  # at best_epoch
        "max_val_accuracy": max(h["val_accuracy"] for h in history),
        "min_val_loss": min(h["val_loss"] for h in history),
        "result_weights": "best epoch" if stopper.restores_best else "last epoch",
        "result_val_accuracy": val.accuracy,
        "result_val_loss": val.loss,
        "train_images_per_s": (timing["train_images"] / timing["train_seconds"]
                               if timing["train_seconds"] else None),
        "wall_seconds": sum(h["seconds"] for h in history),
        "devices": [str(d) for d in mesh.devices.flat],
        "num_train_examples": len(data.train),
        "num_val_examples": len(data.validation),
    }
    report.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
