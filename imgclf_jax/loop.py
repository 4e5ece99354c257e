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
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imgclf_jax import checkpoint as ckpt_lib
from imgclf_jax import config as config_lib
from imgclf_jax import banner, memory, parallel, report, steps, workdir_lock
from imgclf_jax import progress as progress_lib
from imgclf_jax.data import pipeline, splits
from imgclf_jax.early_stopping import EarlyStopping
from imgclf_jax.errors import CheckpointError, ConfigError, UserError
from imgclf_jax.models import create_model, layer_specs
from imgclf_jax.optim import create_optimizer

# Keys that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = ("train.num_epochs", "data.num_workers", "model.fast_path", "train.keep_checkpoints")


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


# What a run writes into its workdir; --overwrite removes these and nothing else.
RUN_FILES = ("config.json", "history.json", "summary.json", "accuracy.png", "loss.png",
             "confusion_matrix.json", "confusion_matrix.png", "submission.csv", "checkpoints")
RUN_FILE_PATTERN = re.compile(r"submission_member_\d+\.csv")  # an ensemble's per-member submissions


def run_files(workdir: str) -> list[str]:
    """The names of the run's own files (RUN_FILES, per-member submissions) present in `workdir`, in order."""
    names = os.listdir(workdir) if os.path.isdir(workdir) else []
    return ([n for n in RUN_FILES if n in names]
            + sorted((n for n in names if RUN_FILE_PATTERN.fullmatch(n)), key=lambda n: int(re.sub(r"\D", "", n))))


def check_workdir_place(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that is a file or lies inside data.dir (before anything is written there).

    Raises:
      ConfigError: naming the workdir.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir '{workdir}' is a file, not a folder")
    if config.data.dir and os.path.isdir(config.data.dir):
        data_dir, real = os.path.realpath(config.data.dir), os.path.realpath(workdir)
        if os.path.commonpath([data_dir, real]) == data_dir:
            raise ConfigError(f"--workdir '{workdir}' lies inside data.dir ({config.data.dir}); "
                              "the data folder is never written to")


def check_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Refuses to reuse a workdir that holds a run of another config (unless `overwrite`).

    With `overwrite`, the previous run's own files (RUN_FILES) are removed;
    other files in the folder are left alone. A workdir inside the data folder
    is refused, as is a config.json that is not an imgclf_jax run's.

    Raises:
      ConfigError: the workdir's config.json differs in keys other than RESUMABLE_CHANGES,
        or is not a run config, or the workdir is a file, lies inside data.dir or is not writable.
    """
    check_workdir_place(workdir, config)
    path = os.path.join(workdir, "config.json")
    old = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if not (isinstance(old, dict) and {"data", "model", "train"} <= set(old)):
            raise ConfigError(f"--workdir '{workdir}' holds a config.json that is not an imgclf_jax "
                              "run's; choose another --workdir")
    if old is not None and overwrite:
        print(f"--overwrite: removing the previous run's files in {workdir}")
        for name in RUN_FILES + tuple(sorted(n for n in os.listdir(workdir) if RUN_FILE_PATTERN.fullmatch(n))):
            target = os.path.join(workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        old = None
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir '{workdir}' cannot be written: {e.strerror}") from None
    if old is None:
        return
    old = _flat(old)
    new = _flat(json.loads(json.dumps(config.to_dict())))
    # A key added to the schema after the run started counts as its default there.
    defaults = _flat(json.loads(json.dumps(config_lib.base_config().to_dict())))
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
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
    """Results over one split: mean loss, accuracy and probabilities float32[N, C].

    For an ensemble's eval step (a leading member axis K): loss and accuracy are
    float64[K] and probabilities float32[K, N, C].
    """

    loss: float | np.ndarray
    accuracy: float | np.ndarray
    probabilities: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        """int64[N] (or [K, N]) predicted classes (argmax of the probabilities)."""
        return np.argmax(self.probabilities, axis=-1)


def evaluate(eval_step, params, split: splits.Split, config, mesh, desc: str = "evaluate") -> Evaluation:
    """Runs `eval_step` over every row of `split` (in order, padded batches masked out).

    `eval_step(params, batch)` returns (metric sums, probabilities ``[..., B, C]``);
    a leading member axis, if any, is kept in the result. Progress (images, images/s)
    goes to stderr as a :class:`imgclf_jax.progress.Bar` named `desc`.
    """
    totals = None
    probabilities = []
    bar = progress_lib.Bar(len(split), desc)
    try:
        for batch in pipeline.iterate(pipeline.eval_dataset(split, config), config.data.num_workers):
            metrics, probs = eval_step(params, parallel.shard_batch(batch, mesh))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
            probabilities.append(np.asarray(probs)[..., batch["mask"], :])
            bar.update(int(np.sum(batch["mask"])))
    finally:
        bar.close()
    totals = {k: np.asarray(v, np.float64) for k, v in jax.device_get(totals).items()}
    count = np.maximum(totals["count"], 1.0)
    loss, accuracy = totals["loss_sum"] / count, totals["correct"] / count
    if loss.ndim == 0:
        loss, accuracy = float(loss), float(accuracy)
    return Evaluation(loss=loss, accuracy=accuracy, probabilities=np.concatenate(probabilities, axis=-2))


def count_params(params) -> int:
    """Total number of scalars in a params pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclasses.dataclass
class Progress:
    """Where a run is, in JSON-serializable form (saved with every checkpoint).

    epoch: 0-based epoch in progress (or next); batch: next batch within it.
    totals: the epoch's running sums so far (loss_sum, correct, count; host float64).
    seconds: wall time spent in the epoch so far.
    """

    epoch: int = 0
    batch: int = 0
    totals: dict = dataclasses.field(default_factory=lambda: {"loss_sum": 0.0, "correct": 0.0, "count": 0.0})
    seconds: float = 0.0
    history: list = dataclasses.field(default_factory=list)
    early_stopping: dict = dataclasses.field(default_factory=dict)
    timing: dict = dataclasses.field(default_factory=lambda: {"train_seconds": 0.0, "train_images": 0})
    data: str = ""  # the prepared dataset's name: a resumed run must see the same data


class Interrupted(UserError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

    exit_code = 130


class InterruptGuard:
    """Turns the first SIGINT / SIGTERM into a flag the loop checks after each step.

    A second signal of the same kind acts as usual (KeyboardInterrupt / termination).
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # second signal: give up at once
            handler = self._previous.get(signum)
            if callable(handler):
                handler(signum, frame)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: saving a checkpoint after this step, then stopping", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def prepare_run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> tuple:
    """What every training job does first: checks the workdir and the model's fit, loads the data,
    builds the model, the optimizer and the device mesh, checks the memory of
    ``ensemble.num_members`` members (1 for a plain run), then writes config.json.

    config.json is written last, so a run refused by any of these checks leaves
    nothing behind that would make the corrected command look like "another config".

    Returns:
      (data: splits.RunData, model, tx, learning-rate schedule, mesh, memory figures of
      :func:`imgclf_jax.memory.check_fits`).
    """
    check_workdir(workdir, config, overwrite)
    layer_specs(config.model, config.data.image_size, 2)  # a model that fits the image, before any data work
    data = splits.load_run_data(config.data)
    model = create_model(config.model, data.num_classes)
    tx, schedule = create_optimizer(config.optimizer)
    mesh = parallel.make_mesh(config.train.batch_size)
    member = memory.member_memory(model, tx, config.model.l2, config.data.image_size,
                                  config.train.batch_size // mesh.size)
    figures = memory.check_fits(member, config.ensemble.num_members, bool(config.train.early_stopping.monitor),
                                list(mesh.devices.flat), config.data.image_size)
    report.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    return data, model, tx, schedule, mesh, figures


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> dict:
    """Trains `config` in `workdir` and writes every output; returns the summary dict.

    Resumes from the latest checkpoint of the workdir, which is written after
    every epoch and when SIGINT/SIGTERM arrives (mid-epoch, after the current
    step). A resumed run computes exactly what an uninterrupted one would: the
    checkpoint holds the train state, the best weights, early stopping, the
    epoch's running sums and the batch position (batches are a pure function
    of the seed and their index).

    Raises:
      ConfigError, DataError: bad config or data (before any training step).
      TrainingError: a NaN or infinite training loss, naming the step (the checkpoints stay intact).
      Interrupted: SIGINT or SIGTERM (after saving a checkpoint).

    A config with ``ensemble.num_members > 1`` is an ensemble job
    (:func:`imgclf_jax.ensemble.loop.train_ensemble`).

    The workdir is locked for the whole call (:mod:`imgclf_jax.workdir_lock`): a second
    run on it, in this or another process, stops with WorkdirBusy (a ConfigError) before
    anything in the workdir is touched.
    """
    check_workdir_place(workdir, config)
    with workdir_lock.WorkdirLock(workdir):
        if config.ensemble.num_members > 1:
            from imgclf_jax.ensemble.loop import train_ensemble

            return train_ensemble(config, workdir, overwrite)
        return _train_plain(config, workdir, overwrite)


def _train_plain(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> dict:
    """:func:`train_and_evaluate` of a plain (one-member) run, inside the workdir lock."""
    data, model, tx, schedule, mesh, _ = prepare_run(config, workdir, overwrite)
    rep = parallel.replicated(mesh)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    train_step = steps.jit_train_step(model, tx, config.model.l2, mesh)
    eval_step = steps.jit_eval_step(model, config.model.l2, mesh)
    train = pipeline.train_pipeline(data.train, config)
    es = config.train.early_stopping
    stopper = EarlyStopping(es.monitor, es.patience)
    checkpoints = ckpt_lib.RunCheckpoints(workdir)
    make_state = jax.jit(lambda key: steps.create_train_state(model, tx, key, config.data.image_size),
                         out_shardings=rep)

    best_params = None
    if checkpoints.latest_step() is not None:
        abstract = ckpt_lib.abstract_like(jax.eval_shape(make_state, init_key), rep)
        state, best_params, saved = checkpoints.restore_latest(
            abstract, abstract.params if stopper.restores_best else None)
        progress = Progress(**saved)
        if progress.data != data.fingerprint:
            raise ConfigError(
                f"the data changed since the run in '{workdir}' started ({progress.data} -> "
                f"{data.fingerprint}); use another --workdir, or --overwrite to start again")
        stopper = EarlyStopping.from_state_dict(progress.early_stopping)
    elif (done := finished_summary(workdir, config, checkpoints)) is not None:
        return done
    else:
        state, progress = make_state(init_key), Progress(data=data.fingerprint)
    num_params = count_params(state.params)
    print(banner.start_banner(config, workdir, data, num_params, list(mesh.devices.flat),
                              start_text(progress, stopper.stopped, config.train.num_epochs)), flush=True)

    def save() -> None:
        progress.early_stopping = stopper.state_dict()
        checkpoints.save_latest(int(state.step), state, best_params if stopper.restores_best else None,
                                dataclasses.asdict(progress))

    with InterruptGuard() as guard:
        while progress.epoch < config.train.num_epochs and not stopper.stopped:
            epoch = progress.epoch
            state, finished = run_epoch(
                state, train, lambda st, batch: train_step(st, batch, dropout_key),
                lambda batch: parallel.shard_batch(batch, mesh), progress, guard, config.train.num_epochs,
                _accumulate_run(progress, workdir))
            if not finished:
                save()
                checkpoints.close()
                raise Interrupted(f"{guard.signal_name} at epoch {epoch + 1}, batch {progress.batch}: "
                                  f"checkpoint saved in {workdir}; rerun the same command to resume")
            started = time.perf_counter()
            val = evaluate(eval_step, state.params, data.validation, config, mesh, desc="validation")
            if not np.isfinite(val.loss):
                checkpoints.close()
                raise TrainingError(
                    f"validation loss is {val.loss} after epoch {epoch + 1} (the weights are not finite); "
                    f"stopped without saving them; the last good checkpoint is in {workdir}/checkpoints")
            t = progress.totals
            entry = {
                "epoch": epoch + 1,
                "train_loss": t["loss_sum"] / t["count"],
                "train_accuracy": t["correct"] / t["count"],
                "val_loss": val.loss,
                "val_accuracy": val.accuracy,
                "learning_rate": float(f"{float(schedule(int(state.step))):.7g}"),  # float32, no noise digits
                "seconds": progress.seconds + time.perf_counter() - started,
            }
            print(f"epoch {epoch + 1}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in entry.items() if k not in ("epoch", "seconds", "learning_rate"))
                + f", learning_rate {entry['learning_rate']:.3g}, {entry['seconds']:.0f}s; "
                + progress_lib.eta_text([h["seconds"] for h in progress.history] + [entry["seconds"]],
                                        config.train.num_epochs - epoch - 1, stopper.restores_best))
            progress.history.append(entry)
            if stopper.update(epoch, entry) and stopper.restores_best:
                best_params = jax.tree.map(jnp.copy, state.params)
            progress.epoch, progress.batch, progress.seconds = epoch + 1, 0, 0.0
            progress.totals = Progress().totals
            save()
            report.write_json(os.path.join(workdir, "history.json"), progress.history)
            if guard.signal_name is not None and progress.epoch < config.train.num_epochs:
                checkpoints.close()
                raise Interrupted(f"{guard.signal_name} after epoch {progress.epoch}: checkpoint saved "
                                  f"in {workdir}; rerun the same command to resume")

    result_params = best_params if (stopper.restores_best and best_params is not None) else state.params
    summary = finish(config, workdir, data, result_params, progress.history, stopper, progress.timing,
                     num_params, checkpoints, eval_step, mesh)
    keep_checkpoints(config, checkpoints)
    return summary


def start_text(progress: Progress, stopped: bool, num_epochs: int) -> str:
    """The start banner's last words: a fresh run, a resumed one (where), or a finished one."""
    if progress.epoch == 0 and progress.batch == 0:
        return "fresh run"
    if stopped or progress.epoch >= num_epochs:
        return f"finished run ({progress.epoch} epochs); writing its reports again"
    return f"resuming at epoch {progress.epoch + 1}, batch {progress.batch} (from checkpoints/latest)"


def keep_checkpoints(config, checkpoints: ckpt_lib.RunCheckpoints) -> None:
    """Once a run has finished: deletes checkpoints/latest if ``train.keep_checkpoints == 'result'``."""
    if config.train.keep_checkpoints == "result":
        checkpoints.remove_latest()
        print(f"train.keep_checkpoints='result': removed {checkpoints.latest_dir} (kept {checkpoints.result_dir})")
    checkpoints.close()


def finished_summary(workdir: str, config, checkpoints: ckpt_lib.RunCheckpoints) -> dict | None:
    """The summary of a finished run whose checkpoints/latest was removed (train.keep_checkpoints='result').

    Returns None when the workdir holds no such run (no result checkpoint or no summary.json):
    training starts afresh.

    Raises:
      CheckpointError: the finished run is asked to train further (more ``train.num_epochs``
        than it ran, and it did not stop early): without checkpoints/latest it cannot.
    """
    path = os.path.join(workdir, "summary.json")
    if not (os.path.isdir(checkpoints.result_dir) and os.path.isfile(path)):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        epochs = int(summary["epochs_run"])
        if "members" in summary:
            stopped = all(m["stopped_early"] or m["nan_step"] is not None for m in summary["members"])
        else:
            stopped = bool(summary["stopped_early"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"'{path}' is unreadable ({e}) and '{checkpoints.latest_dir}' is gone; "
                              "rerun with --overwrite to train the run again") from None
    if stopped or epochs >= config.train.num_epochs:
        checkpoints.close()
        print(f"{workdir} holds a finished run ({epochs} epochs) whose resume checkpoints were removed "
              "(by train.keep_checkpoints='result' or by hand); its reports stay as they are")
        return summary
    raise CheckpointError(
        f"the run in '{workdir}' finished after {epochs} epochs and its resume checkpoints were removed "
        f"(by train.keep_checkpoints='result' or by hand), so it cannot train to {config.train.num_epochs} epochs; "
        "rerun with --overwrite to train it again from the start")


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


def _accumulate_run(progress: Progress, workdir: str):
    """A plain run's step-metrics handler for :func:`run_epoch`: NaN check, then the epoch's sums."""

    def accumulate(metrics, global_step: int, batch_index: int) -> dict:
        values = _check_finite(metrics, global_step, progress.epoch, batch_index, workdir)
        for key in progress.totals:
            progress.totals[key] += values[key]
        t = progress.totals
        return {"loss": f"{t['loss_sum'] / t['count']:.4f}", "acc": f"{t['correct'] / t['count']:.4f}"}

    return accumulate


def run_epoch(state, train, run_step, shard, progress: Progress, guard: InterruptGuard, num_epochs: int,
              accumulate) -> tuple[object, bool]:
    """Runs the rest of epoch `progress.epoch` from batch `progress.batch`, updating `progress`.

    Args:
      state: the train state (any pytree with a ``step``-carrying leaf the step donates).
      train: the TrainPipeline.
      run_step: ``(state, device batch) -> (state, device metrics)``.
      shard: host batch -> device batch.
      accumulate: ``(device metrics, global step (1-based), batch index) -> progress-bar fields``;
        adds the step to ``progress.totals`` and raises to stop the run.

    Each step's metrics are read one step late (so the device stays busy).
    Returns (state, True when the epoch is complete; False when interrupted:
    then `progress` points at the next batch to run).
    """
    epoch, first = progress.epoch, progress.batch
    steps_per_epoch = train.steps_per_epoch
    bar = progress_lib.Bar(train.epoch_size, f"epoch {epoch + 1}/{num_epochs}")  # plain lines if not a tty
    started = time.perf_counter()
    steady_start, steady_images = None, 0
    pending = None  # (batch index, device metrics) of the step before

    def absorb(item) -> None:
        batch_index, device_metrics = item
        postfix = accumulate(device_metrics, epoch * steps_per_epoch + batch_index + 1, batch_index)
        progress.batch = batch_index + 1
        bar.set_postfix(**postfix)

    iterator = train.batches(epoch * steps_per_epoch + first, (epoch + 1) * steps_per_epoch)
    try:
        for i, batch in enumerate(iterator, start=first):
            state, metrics = run_step(state, shard(batch))
            mask = batch["mask"]
            real = int(mask.reshape(-1, mask.shape[-1])[0].sum())  # images of one (member's) stream
            if pending is not None:
                absorb(pending)
            pending = (i, metrics)
            if steady_start is None:
                jax.block_until_ready(state)  # compilation and warm-up stay out of the timing
                steady_start = time.perf_counter()
            else:
                steady_images += real
            bar.update(real)
            if guard.signal_name is not None:
                break
        if pending is not None:
            absorb(pending)
    finally:
        iterator.close()  # stops grain's worker processes
        bar.close()
    if steady_images:
        progress.timing["train_seconds"] += time.perf_counter() - steady_start
        progress.timing["train_images"] += steady_images
    progress.seconds += time.perf_counter() - started
    return state, progress.batch == steps_per_epoch


def finish(config, workdir, data, params, history, stopper, timing, num_params, checkpoints,
           eval_step, mesh) -> dict:
    """Saves the result checkpoint and writes the confusion matrix, curves, submission and summary."""
    checkpoints.save_result(params, {
        "class_names": data.class_names,
        "num_classes": data.num_classes,
        "config": config.to_dict(),
    })
    val = evaluate(eval_step, params, data.validation, config, mesh, desc="validation, result weights")
    matrix = report.confusion_matrix(data.validation.labels, val.predictions, data.num_classes)
    report.save_confusion_matrix(matrix, data.class_names, workdir,
                                 f"validation, result weights: accuracy {val.accuracy:.4f}")
    report.plot_curves(history, workdir, best_epoch=history[stopper.best_epoch]["epoch"], monitor=stopper.tracked)
    test_accuracy = None
    if data.test is not None:
        test = evaluate(eval_step, params, data.test, config, mesh, desc="test")
        report.write_submission(os.path.join(workdir, "submission.csv"), data.test.image_ids,
                                test.predictions, data.class_names)
        test_accuracy = labelled_accuracy(data.test.labels, test.predictions)
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
    if test_accuracy is not None:  # a labelled test split (folders test/<class>/, test.csv with labels)
        summary.update(test_accuracy=test_accuracy, num_test_examples=len(data.test))
    report.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def labelled_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float | None:
    """Top-1 accuracy of `predictions` (int[N]) against `labels` (int64[N]); None when the split is
    unlabeled (any label -1)."""
    labels = np.asarray(labels)
    if len(labels) == 0 or (labels < 0).any():
        return None
    return float(np.mean(np.asarray(predictions) == labels))
