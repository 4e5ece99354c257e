"""The plain run as a job for the driver: one model, one seed, Keras-style early stopping, its reports.

The same seed drives init (``split(key(seed))[0]``), dropout (``[1]``, folded
with the step), data order and augmentation. The result weights are the last
epoch's, or the best epoch's when early stopping restores them. At the end:
the result checkpoint, the confusion matrix and curves of the validation split,
``submission.csv`` for a test split (with ``test_accuracy`` when it is
labelled) and summary.json.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from imgclf_jax import checkpoint as ckpt_lib
from imgclf_jax import distributed, parallel, report, steps
from imgclf_jax.data import device_augment, pipeline
from imgclf_jax.early_stopping import EarlyStopping
from imgclf_jax.errors import TrainingError
from imgclf_jax.evaluation import evaluate, labelled_accuracy
from imgclf_jax.job import Job, RunParts, count_params


def _check_finite(metrics, global_step: int, epoch: int, batch: int, workdir: str) -> dict:
    """Host copy of one step's metrics; raises TrainingError if its loss is NaN or infinite."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss_sum"]):
        loss = values["loss_sum"] / max(values["count"], 1.0)
        raise TrainingError(
            f"training loss is {loss} at step {global_step} (epoch {epoch + 1}, batch {batch + 1}); "
            f"stopped; the checkpoints of the last good epoch are in {workdir}/checkpoints"
        )
    return values


class PlainJob(Job):
    """One model trained on the run's seed (``ensemble.num_members == 1``); see the module docstring."""

    def __init__(self, config, workdir: str, parts: RunParts):
        self.config, self.workdir, self.parts = config, workdir, parts
        model, tx, mesh = parts.model, parts.tx, parts.mesh
        self.rep = parallel.replicated(mesh)
        self.init_key, self.dropout_key = jax.random.split(jax.random.key(config.seed))
        ema_decay = config.train.ema_decay
        self.train_step = steps.jit_train_step(model, tx, config.model.l2, mesh, loss_fn=parts.loss_fn,
                                               batch_transform=parts.batch_transform, ema_decay=ema_decay)
        self.eval_step = steps.jit_eval_step(model, config.model.l2, mesh, loss_fn=parts.loss_fn,
                                             eval_transform=parts.eval_transform)
        self.train = pipeline.train_pipeline(parts.data.train, config, shard=distributed.share())
        self.device_stage = device_augment.stage_for(self.train, parts.data.train, config, mesh)
        es = config.train.early_stopping
        self.stopper = EarlyStopping(es.monitor, es.patience)
        self.keeps_best = self.stopper.restores_best
        self._best = None
        image_size = config.data.image_size
        self._make_state = jax.jit(lambda key: steps.create_train_state(model, tx, key, image_size, ema_decay),
                                   out_shardings=self.rep)

    # ----------------------------------------------------------------- state

    def init_state(self):
        return self._make_state(self.init_key)

    def abstract_state(self):
        abstract = ckpt_lib.abstract_like(jax.eval_shape(self._make_state, self.init_key), self.rep)
        return abstract, steps.eval_variables(abstract) if self.keeps_best else None

    def restore(self, state, best_params, stopping: dict) -> None:
        self._best = best_params
        self.stopper = EarlyStopping.from_state_dict(stopping)

    def empty_totals(self) -> dict:
        return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}

    def num_params(self, state) -> int:
        return count_params(state.params)

    def stopped(self) -> bool:
        return self.stopper.stopped

    def stopping_state(self) -> dict:
        return self.stopper.state_dict()

    def best_params(self):
        return self._best if self.keeps_best else None

    def checkpoint_position(self, state, progress) -> int:
        return int(state.step)

    # ----------------------------------------------------------------- steps

    def step(self, state, batch):
        batch = parallel.shard_batch(batch, self.parts.mesh)
        if self.device_stage is not None:  # data.augment_on='device': pixels and draws -> the step's batch
            batch = self.device_stage(batch)
        return self.train_step(state, batch, self.dropout_key)

    def accumulate(self, progress, metrics, global_step: int, batch_index: int) -> dict:
        values = _check_finite(metrics, global_step, progress.epoch, batch_index, self.workdir)
        for key in progress.totals:
            progress.totals[key] += values[key]
        t = progress.totals
        return {"loss": f"{t['loss_sum'] / t['count']:.4f}", "acc": f"{t['correct'] / t['count']:.4f}"}

    def end_epoch(self, state, progress):
        epoch = progress.epoch
        val = evaluate(self.eval_step, steps.eval_variables(state), self.parts.data.validation, self.config, self.parts.mesh,
                       desc="validation")
        if not np.isfinite(val.loss):
            raise TrainingError(
                f"validation loss is {val.loss} after epoch {epoch + 1} (the weights are not finite); "
                f"stopped without saving them; the last good checkpoint is in {self.workdir}/checkpoints")
        t = progress.totals
        entry = {
            "epoch": epoch + 1,
            "train_loss": t["loss_sum"] / t["count"],
            "train_accuracy": t["correct"] / t["count"],
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "learning_rate": float(f"{float(self.parts.schedule(int(state.step))):.7g}"),  # float32, no noise digits
        }
        if self.stopper.update(epoch, entry) and self.keeps_best:
            self._best = jax.tree.map(jnp.copy, steps.eval_variables(state))
        return state, entry

    def epoch_line(self, entry: dict) -> str:
        return (f"epoch {entry['epoch']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in entry.items() if k not in ("epoch", "seconds", "learning_rate", "train_images_per_s"))
            + f", learning_rate {entry['learning_rate']:.3g}, {entry['seconds']:.0f}s")

    # ----------------------------------------------------------------- result

    def finish(self, state, progress, checkpoints) -> dict:
        """Saves the result checkpoint and writes the confusion matrix, curves, submission and summary."""
        config, workdir, data, mesh = self.config, self.workdir, self.parts.data, self.parts.mesh
        stopper, history, timing = self.stopper, progress.history, progress.timing
        params = self._best if (self.keeps_best and self._best is not None) else steps.eval_variables(state)
        checkpoints.save_result(params, {
            "class_names": data.class_names,
            "num_classes": data.num_classes,
            "config": config.to_dict(),
        })
        val = evaluate(self.eval_step, params, data.validation, config, mesh, desc="validation, result weights")
        matrix = report.confusion_matrix(data.validation.labels, val.predictions, data.num_classes)
        report.save_confusion_matrix(matrix, data.class_names, workdir,
                                     f"validation, result weights: accuracy {val.accuracy:.4f}")
        report.plot_curves(history, workdir, best_epoch=history[stopper.best_epoch]["epoch"],
                           monitor=stopper.tracked)
        test_accuracy = None
        if data.test is not None:
            test = evaluate(self.eval_step, params, data.test, config, mesh, desc="test")
            report.write_submission(os.path.join(workdir, "submission.csv"), data.test.image_ids,
                                    test.predictions, data.class_names)
            test_accuracy = labelled_accuracy(data.test.labels, test.predictions)
        best = history[stopper.best_epoch]
        summary = {
            "num_params": self.num_params(state),
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
            "augment_on": self.train.augment_on,  # data.augment_on as resolved on this backend
            "data_on_device": self.train.on_device,
            "num_train_examples": len(data.train),
            "num_val_examples": len(data.validation),
        }
        if test_accuracy is not None:  # a labelled test split (folders test/<class>/, test.csv with labels)
            summary.update(test_accuracy=test_accuracy, num_test_examples=len(data.test))
        report.write_json(os.path.join(workdir, "summary.json"), summary)
        return summary
