"""An ensemble job: K members trained together, each with its own early stopping, then voted.

``config.ensemble.num_members = K > 1`` (:func:`imgclf_jax.loop.train_and_evaluate`
hands such configs here). Member i is the plain run with seed ``seed + i``
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
split. Checkpoints and resuming work as for a plain run.

``history.json`` has one dict per epoch whose member metrics are lists
indexed by member (``train_loss``, ``train_accuracy``, ``val_loss``,
``val_accuracy``, ``learning_rate``, ``trained``; train metrics are null for a
member that did not train that epoch) plus ``majority_val_accuracy`` and
``soft_val_accuracy``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from imgclf_jax import checkpoint as ckpt_lib
from imgclf_jax import banner, loop, memory, parallel, report
from imgclf_jax import progress as progress_lib
from imgclf_jax.data import pipeline
from imgclf_jax.early_stopping import EarlyStopping
from imgclf_jax.ensemble import steps as ens_steps
from imgclf_jax.ensemble.mapping import resolve_mapping
from imgclf_jax.ensemble.voting import majority_vote, soft_vote, vote
from imgclf_jax.errors import ConfigError


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a non-finite metric is written as null."""
    return float(value) if math.isfinite(value) else None


@jax.jit
def _select_params(mask, new, old):
    return ens_steps.select_members(mask, new, old)


def _empty_totals(k: int) -> dict:
    return {"loss_sum": [0.0] * k, "correct": [0.0] * k, "count": [0.0] * k}


def _accumulate_members(progress: loop.Progress, nan_steps: list, num_members: int):
    """The step-metrics handler for :func:`imgclf_jax.loop.run_epoch`: per-member sums and NaN reports."""

    def accumulate(metrics, global_step: int, batch_index: int) -> dict:
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

    return accumulate


def train_ensemble(config, workdir: str, overwrite: bool = False) -> dict:
    """Trains ``config.ensemble.num_members`` members of `config` in `workdir`; returns the summary dict.

    Raises:
      ConfigError, DataError: bad config or data, or K members that do not fit in memory
        (before any training step).
      Interrupted: SIGINT or SIGTERM (after saving a checkpoint; rerun to resume).
      TrainingError: every member was frozen by a non-finite loss (raised after the reports are written).
    """
    k = config.ensemble.num_members
    data, model, tx, schedule, mesh, mem_figures = loop.prepare_run(config, workdir, overwrite)
    rep = parallel.replicated(mesh)
    es = config.train.early_stopping
    keeps_best = bool(es.monitor)
    mode = resolve_mapping(config.ensemble.mapping)
    shared = config.ensemble.shared_data
    seeds = ens_steps.member_seeds(config.seed, k)
    init_keys, dropout_keys = ens_steps.member_keys(config.seed, k)
    dropout_keys = jax.device_put(dropout_keys, rep)
    train_step = ens_steps.jit_train_step(model, tx, config.model.l2, mesh, mode, shared)
    eval_step = ens_steps.jit_eval_step(model, config.model.l2, mesh, mode)
    if shared:
        train = pipeline.train_pipeline(data.train, config)
    else:
        train = pipeline.ensemble_train_pipeline(data.train, config, seeds)
    checkpoints = ckpt_lib.RunCheckpoints(workdir)
    make_state = jax.jit(lambda keys: ens_steps.create_ensemble_state(model, tx, keys, config.data.image_size),
                         out_shardings=rep)
    print(f"ensemble: {k} members (seeds {seeds[0]}..{seeds[-1]}), mapping '{mode}', "
          f"{'shared batches' if shared else 'own batches per member'}, about "
          f"{mem_figures['need_bytes'] / memory.GIB:.2f} GiB per device")

    if checkpoints.latest_step() is not None:
        abstract = ckpt_lib.abstract_like(jax.eval_shape(make_state, init_keys), rep)
        state, best_params, saved = checkpoints.restore_latest(
            abstract, abstract.members.params if keeps_best else None)
        progress = loop.Progress(**saved)
        if progress.data != data.fingerprint:
            raise ConfigError(
                f"the data changed since the run in '{workdir}' started ({progress.data} -> "
                f"{data.fingerprint}); use another --workdir, or --overwrite to start again")
        stoppers = [EarlyStopping.from_state_dict(d) for d in progress.early_stopping["members"]]
        nan_steps = list(progress.early_stopping["nan_steps"])
    elif (done := loop.finished_summary(workdir, config, checkpoints)) is not None:
        return done
    else:
        state = make_state(init_keys)
        best_params = jax.tree.map(jnp.copy, state.members.params) if keeps_best else None
        progress = loop.Progress(data=data.fingerprint, totals=_empty_totals(k))
        stoppers = [EarlyStopping(es.monitor, es.patience) for _ in range(k)]
        nan_steps = [None] * k
    num_params = loop.count_params(state.members.params) // k
    start = loop.start_text(progress, all(s.stopped for s in stoppers), config.train.num_epochs)
    print(banner.start_banner(config, workdir, data, num_params, list(mesh.devices.flat), start), flush=True)

    def save() -> None:
        progress.early_stopping = {"members": [s.state_dict() for s in stoppers], "nan_steps": nan_steps}
        # Numbered by batches done (not updates: frozen members stop counting), which grows with every save.
        position = progress.epoch * train.steps_per_epoch + progress.batch
        checkpoints.save_latest(position, state, best_params, dataclasses.asdict(progress))

    with loop.InterruptGuard() as guard:
        while progress.epoch < config.train.num_epochs and not all(s.stopped for s in stoppers):
            epoch = progress.epoch
            trained = [not s.stopped for s in stoppers]
            state, finished = loop.run_epoch(
                state, train, lambda st, batch: train_step(st, batch, dropout_keys),
                lambda batch: parallel.shard_batch(batch, mesh, members=not shared), progress, guard,
                config.train.num_epochs, _accumulate_members(progress, nan_steps, k))
            if not finished:
                save()
                checkpoints.close()
                raise loop.Interrupted(f"{guard.signal_name} at epoch {epoch + 1}, batch {progress.batch}: "
                                       f"checkpoint saved in {workdir}; rerun the same command to resume")
            started = time.perf_counter()
            val = loop.evaluate(eval_step, state.members.params, data.validation, config, mesh, desc="validation")
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
            if keeps_best and improved.any():
                best_params = _select_params(jnp.asarray(improved), state.members.params, best_params)
            stopped = np.array([s.stopped for s in stoppers])
            state = state.replace(active=jax.device_put(jnp.asarray(~stopped) & state.active, rep))
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
                "learning_rate": [float(f"{float(schedule(int(s))):.7g}") for s in member_steps],
                "trained": trained,
                "majority_val_accuracy": float(np.mean(majority_vote(val.probabilities) == labels)),
                "soft_val_accuracy": float(np.mean(soft_vote(val.probabilities) == labels)),
                "seconds": progress.seconds + time.perf_counter() - started,
            }
            print(f"epoch {epoch + 1}: val_accuracy " + " ".join(f"{v:.4f}" for v in entry["val_accuracy"])
                  + f", majority {entry['majority_val_accuracy']:.4f}, soft {entry['soft_val_accuracy']:.4f}, "
                  f"{int(sum(trained))}/{k} trained, {entry['seconds']:.0f}s; "
                  + progress_lib.eta_text([h["seconds"] for h in progress.history] + [entry["seconds"]],
                                          config.train.num_epochs - epoch - 1, keeps_best))
            progress.history.append(entry)
            progress.epoch, progress.batch, progress.seconds = epoch + 1, 0, 0.0
            progress.totals = _empty_totals(k)
            save()
            report.write_json(os.path.join(workdir, "history.json"), progress.history)
            if guard.signal_name is not None and progress.epoch < config.train.num_epochs:
                checkpoints.close()
                raise loop.Interrupted(f"{guard.signal_name} after epoch {progress.epoch}: checkpoint saved "
                                       f"in {workdir}; rerun the same command to resume")

    result_params = best_params if keeps_best else state.members.params
    summary = finish(config, workdir, data, result_params, progress, stoppers, nan_steps, num_params,
                     checkpoints, eval_step, mesh, mode, mem_figures)
    loop.keep_checkpoints(config, checkpoints)
    if all(step is not None for step in nan_steps):
        raise loop.TrainingError(f"every member's training loss became non-finite (at steps {nan_steps}); "
                                 f"their last good weights and the reports are in {workdir}")
    return summary


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
    return out


def finish(config, workdir, data, params, progress, stoppers, nan_steps, num_params, checkpoints, eval_step,
           mesh, mode, mem_figures) -> dict:
    """Saves the result checkpoint (stacked member params) and writes votes, reports and the summary."""
    k = config.ensemble.num_members
    history = progress.history
    checkpoints.save_result(params, {
        "class_names": data.class_names,
        "num_classes": data.num_classes,
        "num_members": k,
        "config": config.to_dict(),
    })
    val = loop.evaluate(eval_step, params, data.validation, config, mesh, desc="validation, result weights")
    labels = data.validation.labels
    votes = {rule: float(np.mean(vote(val.probabilities, rule) == labels)) for rule in ("majority", "soft")}
    rule = config.ensemble.vote
    matrix = report.confusion_matrix(labels, vote(val.probabilities, rule), data.num_classes)
    report.save_confusion_matrix(matrix, data.class_names, workdir,
                                 f"validation, {k}-member {rule} vote: accuracy {votes[rule]:.4f}")
    report.plot_member_curves(history, workdir,
                              [history[s.best_epoch]["epoch"] if s.best_epoch >= 0 else None for s in stoppers],
                              result_vote=(f"{rule} vote, members at {_members_at(stoppers[0].restores_best)}",
                                           votes[rule]))
    if data.test is not None:
        test = loop.evaluate(eval_step, params, data.test, config, mesh, desc="test")
        test_votes = vote(test.probabilities, rule)
        report.write_submission(os.path.join(workdir, "submission.csv"), data.test.image_ids, test_votes,
                                data.class_names)
        for i in range(k):
            report.write_submission(os.path.join(workdir, f"submission_member_{i}.csv"), data.test.image_ids,
                                    test.predictions[i], data.class_names)
        test_accuracy = loop.labelled_accuracy(data.test.labels, test_votes)
    else:
        test_accuracy = None
    members = []
    for i, stopper in enumerate(stoppers):
        best = history[stopper.best_epoch] if stopper.best_epoch >= 0 else None
        members.append({
            "seed": config.seed + i,
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
        "memory_per_member_bytes": mem_figures["member"],
        "num_train_examples": len(data.train),
        "num_val_examples": len(data.validation),
    }
    if test_accuracy is not None:  # a labelled test split: the vote's accuracy on it
        summary.update(test_accuracy=test_accuracy, num_test_examples=len(data.test))
    report.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
