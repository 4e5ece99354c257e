"""The ensemble job for the driver: K members trained together, each with its own early stopping, then voted.

``config.ensemble.num_members = K > 1`` (:func:`imgclf_jax.loop.train_and_evaluate`
runs such configs as an :class:`EnsembleJob` under :func:`imgclf_jax.driver.train`). Member i is the plain run with seed ``seed + i``
(init, dropout, data order, augmentation), unless ``ensemble.shared_data``
feeds every member the batches of seed ``seed``. Per member:

- its own early stopping (Keras semantics, :mod:`imgclf_jax.early_stopping`):
  it keeps its own best weights and stops updating once its patience runs out;
- a NaN or infinite loss (or non-finite new params) freezes that member at
  its last good weights inside the step; it is reported and the others go on;
- the job ends when every member has stopped or the epochs run out.

Every epoch evaluates every member and both votes. At the end: per-member
result accuracies, majority and soft vote accuracies, the ensemble's confusion
matrix (``ensemble.vote``'s rule), curves of every member, ``submission.csv``
(the chosen rule) and ``submission_member_<i>.csv`` when the data has a test
split. Checkpoints, resuming and interrupts are the driver's, as for a plain run.

``history.json`` has one dict per epoch whose member metrics are lists
indexed by member (``train_loss``, ``train_accuracy``, ``val_loss``,
``val_accuracy``, ``learning_rate``, ``trained``; train metrics are null for a
member that did not train that epoch) plus ``majority_val_accuracy`` and
``soft_val_accuracy``.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from imgclf_jax import checkpoint as ckpt_lib
from imgclf_jax import distributed, memory, optim, parallel, report, steps
from imgclf_jax.data import device_augment, pipeline
from imgclf_jax.early_stopping import EarlyStopping
from imgclf_jax.ensemble import population, steps as ens_steps
from imgclf_jax.ensemble.mapping import resolve_mapping
from imgclf_jax.ensemble.voting import VOTES, majority_vote, soft_vote, vote
from imgclf_jax.errors import TrainingError
from imgclf_jax.evaluation import evaluate, labelled_accuracy
from imgclf_jax.job import Job, RunParts, count_params


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a non-finite metric is written as null."""
    return float(value) if math.isfinite(value) else None


@jax.jit
def _select_params(mask, new, old):
    return ens_steps.select_members(mask, new, old)


def _empty_totals(k: int) -> dict:
    return {"loss_sum": [0.0] * k, "correct": [0.0] * k, "count": [0.0] * k}


def _accumulate_members(progress, nan_steps: list, num_members: int, metrics, global_step: int,
                        batch_index: int) -> dict:
    """One step's per-member sums into ``progress.totals`` and NaN reports; returns the bar's fields."""
    m = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    for i in np.flatnonzero(m["nan"]):
        if nan_steps[i] is None:
            nan_steps[i] = global_step
            loss = m["loss_sum"][i] / max(m["count"][i], 1.0)
            print(f"\nmember {i}: training loss is {loss} at step {global_step} (epoch {progress.epoch + 1}, "
                  f"batch {batch_index + 1}); member {i} is frozen at its last good weights, "
                  "the others go on")
    for key, totals in progress.totals.items():
        for i in np.flatnonzero(m["updated"]):
            totals[i] += float(m[key][i])
    t = progress.totals
    counted = [i for i in range(num_members) if t["count"][i] > 0]
    if not counted:
        return {"active": 0}
    return {"loss": f"{np.mean([t['loss_sum'][i] / t['count'][i] for i in counted]):.4f}",
            "acc": f"{np.mean([t['correct'][i] / t['count'][i] for i in counted]):.4f}",
            "active": int(m["updated"].sum())}


class EnsembleJob(Job):
    """K members trained together (``ensemble.num_members = K > 1``); see the module docstring."""

    def __init__(self, config, workdir: str, parts: RunParts):
        self.config, self.workdir, self.parts = config, workdir, parts
        model, tx, mesh = parts.model, parts.tx, parts.mesh
        self.population = population.members(config)  # K members: seeds, and a sweep's values
        self.k = k = len(self.population)
        self.rep = rep = parallel.replicated(mesh)
        es = config.train.early_stopping
        self.keeps_best = bool(es.monitor)
        self.mode = resolve_mapping(config.ensemble.mapping)
        self.shared = config.ensemble.shared_data
        self.seeds = [m.seed for m in self.population]
        self.init_keys, dropout_keys = ens_steps.member_keys(config.seed, k, self.seeds)
        self.dropout_keys = parallel.replicate(dropout_keys, rep)
        ema_decay = config.train.ema_decay
        if self.shared:
            self.train = pipeline.train_pipeline(parts.data.train, config, shard=distributed.share())
        else:
            self.train = pipeline.ensemble_train_pipeline(parts.data.train, config, self.seeds,
                                                          shard=distributed.share())
        self.device_stage = device_augment.stage_for(self.train, parts.data.train, config, mesh,
                                                     members=not self.shared)
        self.values = population.member_values(config)  # {key: float32[K]}; {} without a sweep
        hooks = (population.member_hooks(config, parts.data.num_classes, self.train.steps_per_epoch)
                 if self.values else None)
        self.schedules = [parts.schedule] * k  # each member's learning rate per update (for the history)
        if "optimizer.learning_rate" in self.values:
            self.schedules = [optim.create_schedule(population.member_config(config, m).optimizer,
                                                    steps_per_epoch=self.train.steps_per_epoch,
                                                    num_epochs=config.train.num_epochs) for m in self.population]
        self.train_step = ens_steps.jit_train_step(model, tx, config.model.l2, mesh, self.mode, self.shared,
                                                   loss_fn=parts.loss_fn, batch_transform=parts.batch_transform,
                                                   ema_decay=ema_decay, values=self.values, hooks=hooks)
        self.eval_step = ens_steps.jit_eval_step(model, config.model.l2, mesh, self.mode, loss_fn=parts.loss_fn,
                                                 eval_transform=parts.eval_transform, values=self.values,
                                                 hooks=hooks)
        image_size = config.data.image_size
        values = {key: np.asarray(v) for key, v in self.values.items()}  # numpy: constants on every process
        self._make_state = jax.jit(lambda keys: ens_steps.create_ensemble_state(model, tx, keys, image_size,
                                                                                ema_decay, values, hooks),
                                   out_shardings=rep)
        self.stoppers = [EarlyStopping(es.monitor, es.patience) for _ in range(k)]
        self.nan_steps: list = [None] * k
        self._best = None
        self.trained = [True] * k

    def describe(self) -> str:
        if self.values:
            combos = self.k // self.config.ensemble.num_members
            return (f"population: {self.k} members = {combos} combinations of "
                    f"{', '.join(population.swept_keys(self.config))} x {self.config.ensemble.num_members} "
                    f"seed(s) ({self.seeds[0]}..{max(self.seeds)}), mapping '{self.mode}', the values as "
                    f"per-member arrays in one compiled step, about "
                    f"{self.parts.memory['need_bytes'] / memory.GIB:.2f} GiB per device")
        return (f"ensemble: {self.k} members (seeds {self.seeds[0]}..{self.seeds[-1]}), mapping '{self.mode}', "
                f"{'shared batches' if self.shared else 'own batches per member'}, about "
                f"{self.parts.memory['need_bytes'] / memory.GIB:.2f} GiB per device")

    # ----------------------------------------------------------------- state

    def init_state(self):
        state = self._make_state(self.init_keys)
        self._best = jax.tree.map(jnp.copy, steps.eval_variables(state.members)) if self.keeps_best else None
        return state

    def abstract_state(self):
        abstract = ckpt_lib.abstract_like(jax.eval_shape(self._make_state, self.init_keys), self.rep)
        return abstract, steps.eval_variables(abstract.members) if self.keeps_best else None

    def restore(self, state, best_params, stopping: dict) -> None:
        self._best = best_params
        self.stoppers = [EarlyStopping.from_state_dict(d) for d in stopping["members"]]
        self.nan_steps = list(stopping["nan_steps"])

    def empty_totals(self) -> dict:
        return _empty_totals(self.k)

    def num_params(self, state) -> int:
        return count_params(state.members.params) // self.k

    def stopped(self) -> bool:
        return all(s.stopped for s in self.stoppers)

    def stopping_state(self) -> dict:
        return {"members": [s.state_dict() for s in self.stoppers], "nan_steps": self.nan_steps}

    def best_params(self):
        return self._best

    def checkpoint_position(self, state, progress) -> int:
        # Numbered by batches done (not updates: frozen members stop counting), which grows with every save.
        return progress.epoch * self.train.steps_per_epoch + progress.batch

    # ----------------------------------------------------------------- steps

    def start_epoch(self) -> None:
        self.trained = [not s.stopped for s in self.stoppers]

    def step(self, state, batch):
        batch = parallel.shard_batch(batch, self.parts.mesh, members=not self.shared)
        if self.device_stage is not None:  # data.augment_on='device': pixels and draws -> the step's batch
            batch = self.device_stage(batch)
        return self.train_step(state, batch, self.dropout_keys)

    def accumulate(self, progress, metrics, global_step: int, batch_index: int) -> dict:
        return _accumulate_members(progress, self.nan_steps, self.k, metrics, global_step, batch_index)

    def end_epoch(self, state, progress):
        k, epoch, trained, stoppers, nan_steps = self.k, progress.epoch, self.trained, self.stoppers, self.nan_steps
        data = self.parts.data
        val = evaluate(self.eval_step, steps.eval_variables(state.members), data.validation, self.config, self.parts.mesh,
                       desc="validation")
        improved = np.zeros(k, bool)
        for i in np.flatnonzero(trained):
            if not math.isfinite(val.loss[i]):
                print(f"member {i}: validation loss is {val.loss[i]} after epoch {epoch + 1}; member frozen")
                nan_steps[i] = nan_steps[i] or int(np.asarray(state.members.step)[i])
            else:
                improved[i] = stoppers[i].update(epoch, {"val_loss": val.loss[i],
                                                         "val_accuracy": val.accuracy[i]})
            if nan_steps[i] is not None:
                stoppers[i].stopped = True
        if self.keeps_best and improved.any():
            self._best = _select_params(parallel.replicate(improved, self.rep), steps.eval_variables(state.members), self._best)
        stopped = np.array([s.stopped for s in stoppers])
        state = state.replace(active=parallel.replicate(~stopped, self.rep) & state.active)
        t = progress.totals
        labels = data.validation.labels
        member_steps = np.asarray(jax.device_get(state.members.step))
        entry = {
            "epoch": epoch + 1,
            "train_loss": [t["loss_sum"][i] / t["count"][i] if trained[i] and t["count"][i] else None
                           for i in range(k)],
            "train_accuracy": [t["correct"][i] / t["count"][i] if trained[i] and t["count"][i] else None
                               for i in range(k)],
            "val_loss": [_finite_or_none(v) for v in val.loss],
            "val_accuracy": [float(v) for v in val.accuracy],
            "learning_rate": [float(f"{float(schedule(int(s))):.7g}") for schedule, s in
                              zip(self.schedules, member_steps)],
            "trained": trained,
            "majority_val_accuracy": float(np.mean(majority_vote(val.probabilities) == labels)),
            "soft_val_accuracy": float(np.mean(soft_vote(val.probabilities) == labels)),
        }
        return state, entry

    def epoch_line(self, entry: dict) -> str:
        return (f"epoch {entry['epoch']}: val_accuracy " + " ".join(f"{v:.4f}" for v in entry["val_accuracy"])
                + f", majority {entry['majority_val_accuracy']:.4f}, soft {entry['soft_val_accuracy']:.4f}, "
                f"{int(sum(entry['trained']))}/{self.k} trained, {entry['seconds']:.0f}s")

    # ----------------------------------------------------------------- result

    def finish(self, state, progress, checkpoints) -> dict:
        """Saves the result checkpoint (stacked member params) and writes votes, reports and the summary."""
        config, workdir, data, mesh = self.config, self.workdir, self.parts.data, self.parts.mesh
        stoppers, nan_steps, eval_step, mode = self.stoppers, self.nan_steps, self.eval_step, self.mode
        params = self._best if self.keeps_best else steps.eval_variables(state.members)
        num_params, mem_figures = self.num_params(state), self.parts.memory
        k = self.k
        history = progress.history
        checkpoints.save_result(params, {
            "class_names": data.class_names,
            "num_classes": data.num_classes,
            "num_members": k,
            "config": config.to_dict(),
        })
        val = evaluate(eval_step, params, data.validation, config, mesh, desc="validation, result weights")
        labels = data.validation.labels
        # Every registered rule's vote (majority and soft first: history.json tracks those two per epoch).
        votes = {rule: float(np.mean(vote(val.probabilities, rule) == labels)) for rule in VOTES.names()}
        rule = config.ensemble.vote
        matrix = report.confusion_matrix(labels, vote(val.probabilities, rule), data.num_classes)
        report.save_confusion_matrix(matrix, data.class_names, workdir,
                                     f"validation, {k}-member {rule} vote: accuracy {votes[rule]:.4f}")
        report.plot_member_curves(history, workdir,
                                  [history[s.best_epoch]["epoch"] if s.best_epoch >= 0 else None for s in stoppers],
                                  result_vote=(f"{rule} vote, members at {_members_at(stoppers[0].restores_best)}",
                                               votes[rule]))
        if data.test is not None:
            test = evaluate(eval_step, params, data.test, config, mesh, desc="test")
            test_votes = vote(test.probabilities, rule)
            report.write_submission(os.path.join(workdir, "submission.csv"), data.test.image_ids, test_votes,
                                    data.class_names)
            for i in range(k):
                report.write_submission(os.path.join(workdir, f"submission_member_{i}.csv"), data.test.image_ids,
                                        test.predictions[i], data.class_names)
            test_accuracy = labelled_accuracy(data.test.labels, test_votes)
        else:
            test_accuracy = None
        members = []
        for i, stopper in enumerate(stoppers):
            best = history[stopper.best_epoch] if stopper.best_epoch >= 0 else None
            members.append({
                "seed": self.seeds[i],
                **({"values": self.population[i].values} if self.values else {}),
                "epochs_trained": sum(1 for h in history if h["trained"][i]),
                "stopped_early": stopper.stopped and nan_steps[i] is None,
                "nan_step": nan_steps[i],  # the update whose loss or params were not finite; null if none
                "best_epoch": best["epoch"] if best else None,
                "best_val_accuracy": best["val_accuracy"][i] if best else None,
                "best_val_loss": best["val_loss"][i] if best else None,
                "result_val_accuracy": float(val.accuracy[i]),
                "result_val_loss": _finite_or_none(float(val.loss[i])),
            })
        timing = progress.timing
        images_per_s = timing["train_images"] / timing["train_seconds"] if timing["train_seconds"] else None
        summary = {
            "num_members": k,
            "num_params": num_params,  # per member
            "mapping": mode,
            "shared_data": config.ensemble.shared_data,
            "epochs_run": len(history),
            "best_metric": stoppers[0].tracked,
            "result_weights": "best epoch" if stoppers[0].restores_best else "last epoch",
            "members": members,
            "vote": _vote_summary(history, votes, rule, stoppers[0].restores_best),
            "result_val_accuracy": votes[rule],
            "mean_member_val_accuracy": float(np.mean(val.accuracy)),
            "train_images_per_s": images_per_s,  # batches of the input stream per second x batch size
            "member_images_per_s": images_per_s * k if images_per_s else None,  # images trained, all members
            "wall_seconds": sum(h["seconds"] for h in history),
            "devices": [str(d) for d in mesh.devices.flat],
            "augment_on": self.train.augment_on,  # data.augment_on as resolved on this backend
            "data_on_device": self.train.on_device,
            "memory_per_member_bytes": mem_figures["member"],
            "num_train_examples": len(data.train),
            "num_val_examples": len(data.validation),
        }
        if self.values:  # a population: its sweep and the members ranked by best validation accuracy
            summary["sweep"] = {"keys": population.swept_keys(config), "ranking": ranking(members)}
        if test_accuracy is not None:  # a labelled test split: the vote's accuracy on it
            summary.update(test_accuracy=test_accuracy, num_test_examples=len(data.test))
        report.write_json(os.path.join(workdir, "summary.json"), summary)
        return summary

    def check_result(self, summary: dict) -> None:
        if all(step is not None for step in self.nan_steps):
            raise TrainingError(f"every member's training loss became non-finite (at steps {self.nan_steps}); "
                                f"their last good weights and the reports are in {self.workdir}")


def ranking(members: list[dict]) -> list[dict]:
    """A population's members by best validation accuracy, best first (ties: the lower index):
    ``[{"member": i, "seed": ..., "values": {...}, "best_val_accuracy": ..., "best_epoch": ...}, ...]``;
    a member without a best epoch (NaN from the start) comes last."""
    order = sorted(range(len(members)), key=lambda i: (members[i]["best_val_accuracy"] is None,
                                                       -(members[i]["best_val_accuracy"] or 0.0), i))
    return [{"member": i, "seed": members[i]["seed"], "values": members[i]["values"],
             "best_val_accuracy": members[i]["best_val_accuracy"], "best_epoch": members[i]["best_epoch"]}
            for i in order]


def _members_at(keeps_best: bool) -> str:
    """Which epoch the result's members are taken at (summary.json, the curves' result-vote line)."""
    return "their own best epochs" if keeps_best else "the last epoch"


def _vote_summary(history: list[dict], votes: dict, rule: str, keeps_best: bool) -> dict:
    """summary.json's "vote": the result's votes beside the best per-epoch votes.

    ``vote.<rule>.val_accuracy`` and ``vote.result`` are votes of the result weights (each member at
    its own best epoch with early stopping, else at the last epoch); ``vote.<rule>.per_epoch_best``
    is the best vote of all members at the same epoch (history's ``<rule>_val_accuracy``; ties go
    to the earlier epoch). The two can differ either way: a vote is not bounded by its members.
    """
    out = {"rule": rule, "result": {"rule": rule, "val_accuracy": votes[rule], "members_at": _members_at(keeps_best)}}
    for name in ("majority", "soft"):
        per_epoch = [h[f"{name}_val_accuracy"] for h in history]
        best = int(np.argmax(per_epoch))
        out[name] = {"val_accuracy": votes[name],  # the result weights' vote
                     "per_epoch_best": {"epoch": history[best]["epoch"], "val_accuracy": per_epoch[best]}}
    for name in votes:  # a rule registered beyond the two history.json tracks: its result vote only
        out.setdefault(name, {"val_accuracy": votes[name]})
    return out
