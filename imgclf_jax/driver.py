"""The training driver: one epoch loop for every job (a plain run, a K-member ensemble).

:func:`train` owns what every run shares: resuming from ``checkpoints/latest``
(or recognising a finished run), the start banner, the epoch loop, a
checkpoint save after every epoch and on SIGINT/SIGTERM (after the current
step), the interrupt exits, history.json, the logs other tools read
(metrics.csv, TensorBoard event files, the preview grid: :mod:`imgclf_jax.tracking`), and closing the
checkpoints on every exit (a ``with`` block). What differs between jobs (state, step, metric sums,
validation, early stopping, reports) is the job's (:class:`imgclf_jax.job.Job`).

A resumed run computes exactly what an uninterrupted one would: the checkpoint
holds the device state, the best weights, the job's bookkeeping, the epoch's
running sums and the batch position (batches are a pure function of the seed
and their index).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import sys
import threading
import time

import jax

from imgclf_jax import banner, distributed, preview, report, tracking
from imgclf_jax import checkpoint as ckpt_lib
from imgclf_jax import progress as progress_lib
from imgclf_jax.ensemble import population
from imgclf_jax.errors import CheckpointError, ConfigError, Interrupted
from imgclf_jax.job import Job


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
    data: str = ""  # RunData.identity (the data's content digest): a resumed run must see the same data
    # TensorBoard's per-step points so far ([update, [mean loss per stream]]) and the running sums at the last one
    # (None = the epoch's start): the log is written again from them on resume (imgclf_jax.tracking).
    step_points: list = dataclasses.field(default_factory=list)
    step_base: dict | None = None


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
        print(f"{workdir} holds a finished run ({epochs} epochs) whose resume checkpoints were removed "
              "(by train.keep_checkpoints='result' or by hand); its reports stay as they are")
        return summary
    raise CheckpointError(
        f"the run in '{workdir}' finished after {epochs} epochs and its resume checkpoints were removed "
        f"(by train.keep_checkpoints='result' or by hand), so it cannot train to {config.train.num_epochs} epochs; "
        "rerun with --overwrite to train it again from the start")


def run_epoch(state, job: Job, progress: Progress, guard: InterruptGuard, num_epochs: int,
              log: tracking.RunLog | None = None, log_every: int = 0) -> tuple[object, bool]:
    """Runs the rest of epoch `progress.epoch` from batch `progress.batch`, updating `progress`.

    Args:
      state: the job's device state (the step donates it).
      job: the job: its pipeline (``job.train``), its step (host batch -> (state, device metrics))
        and its ``accumulate`` (adds a step's metrics to ``progress.totals``; may raise to stop).
      progress, guard, num_epochs: where the run is, the interrupt flag, the epochs to run (for the bar).
      log, log_every: the TensorBoard log and its per-step interval in updates (0 = none): every
        `log_every` updates the mean loss since the previous point goes to ``progress.step_points`` and the log.

    Each step's metrics are read one step late (so the device stays busy).
    Returns (state, True when the epoch is complete; False when interrupted:
    then `progress` points at the next batch to run).
    """
    train = job.train
    epoch, first = progress.epoch, progress.batch
    steps_per_epoch = train.steps_per_epoch
    bar = progress_lib.Bar(train.epoch_size, f"epoch {epoch + 1}/{num_epochs}")  # plain lines if not a tty
    started = time.perf_counter()
    steady_start, steady_images = None, 0
    pending = None  # (batch index, device metrics) of the step before

    def absorb(item) -> None:
        batch_index, device_metrics = item
        global_step = epoch * steps_per_epoch + batch_index + 1
        postfix = job.accumulate(progress, device_metrics, global_step, batch_index)
        progress.batch = batch_index + 1
        if log_every and global_step % log_every == 0:
            losses = tracking.window_losses(progress.totals, progress.step_base)
            progress.step_points.append([global_step, losses])
            progress.step_base = copy.deepcopy(progress.totals)
            if log is not None:
                log.step_loss(global_step, losses)
        bar.set_postfix(**postfix)

    iterator = train.batches(epoch * steps_per_epoch + first, (epoch + 1) * steps_per_epoch)
    try:
        for i, batch in enumerate(iterator, start=first):
            state, metrics = job.step(state, batch)
            real = min(train.batch_size, train.epoch_size - i * train.batch_size)  # images of one (member's) stream
            if pending is not None:
                absorb(pending)
            pending = (i, metrics)
            if steady_start is None:
                jax.block_until_ready(state)  # compilation and warm-up stay out of the timing
                steady_start = time.perf_counter()
            else:
                steady_images += real
            bar.update(real)
            if distributed.any_process(guard.signal_name is not None):  # every process stops at the same step
                guard.signal_name = guard.signal_name or "SIGTERM (on another process)"
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


def train(job: Job) -> dict:
    """Trains `job` in its workdir to ``train.num_epochs`` (or until it stops early); returns the summary.

    Raises:
      ConfigError: the data changed since the run in the workdir started.
      CheckpointError: no restorable checkpoint, or a finished run asked to train further.
      TrainingError: raised by the job (a NaN or infinite loss); the checkpoints stay intact.
      Interrupted: SIGINT or SIGTERM (after saving a checkpoint; rerun the same command to resume).
    """
    config, workdir = job.config, job.workdir
    data, mesh = job.parts.data, job.parts.mesh
    num_epochs = config.train.num_epochs
    line = job.describe()
    if line:
        print(line)
    with ckpt_lib.RunCheckpoints(workdir) as checkpoints:
        if checkpoints.latest_step() is not None:
            abstract_state, abstract_best = job.abstract_state()
            state, best_params, saved = checkpoints.restore_latest(abstract_state, abstract_best)
            progress = Progress(**saved)
            if progress.data not in (data.identity, data.fingerprint):  # runs before digests saved the name
                raise ConfigError(
                    f"the data changed since the run in '{workdir}' started ({progress.data} -> "
                    f"{data.identity}); use another --workdir, or --overwrite to start again")
            job.restore(state, best_params, progress.early_stopping)
        elif (done := finished_summary(workdir, config, checkpoints)) is not None:
            return done
        else:
            state = job.init_state()
            progress = Progress(data=data.identity, totals=job.empty_totals())
        print(banner.start_banner(config, workdir, data, job.num_params(state), list(mesh.devices.flat),
                                  start_text(progress, job.stopped(), num_epochs)), flush=True)
        preview_png = os.path.join(workdir, "preview.png")
        if not os.path.isfile(preview_png):  # the first images of epoch 1 (member 0's stream in an ensemble)
            preview.write_grid(data, config, 0, min(32, len(data.train)), os.path.basename(workdir), preview_png)
        log = tracking.RunLog(workdir, population.population_size(config))
        log.start(config.to_dict(), progress.history, progress.step_points, preview_png)

        def save() -> None:
            progress.early_stopping = job.stopping_state()
            checkpoints.save_latest(job.checkpoint_position(state, progress), state, job.best_params(),
                                    dataclasses.asdict(progress))

        with contextlib.closing(log):  # the TensorBoard writers, on every exit
            with InterruptGuard() as guard:
                while progress.epoch < num_epochs and not job.stopped():
                    epoch = progress.epoch
                    job.start_epoch()
                    timed = dict(progress.timing)
                    state, finished = run_epoch(state, job, progress, guard, num_epochs, log,
                                                config.train.log_every_steps)
                    if not finished:
                        save()
                        raise Interrupted(f"{guard.signal_name} at epoch {epoch + 1}, batch {progress.batch}: "
                                          f"checkpoint saved in {workdir}; rerun the same command to resume")
                    started = time.perf_counter()
                    state, entry = job.end_epoch(state, progress)
                    images = progress.timing["train_images"] - timed["train_images"]
                    seconds = progress.timing["train_seconds"] - timed["train_seconds"]
                    # this process's steady-state rate in the epoch (its first step, compiling, left out)
                    entry["train_images_per_s"] = images / seconds if images and seconds > 0 else None
                    entry["seconds"] = progress.seconds + time.perf_counter() - started
                    print(job.epoch_line(entry) + "; " + progress_lib.eta_text(
                        [h["seconds"] for h in progress.history] + [entry["seconds"]],
                        num_epochs - epoch - 1, job.keeps_best))
                    progress.history.append(entry)
                    progress.epoch, progress.batch, progress.seconds = epoch + 1, 0, 0.0
                    progress.totals, progress.step_base = job.empty_totals(), None
                    save()
                    report.write_json(os.path.join(workdir, "history.json"), progress.history)
                    tracking.write_metrics_csv(os.path.join(workdir, tracking.METRICS_CSV), progress.history)
                    log.epoch(entry)
                    if distributed.any_process(guard.signal_name is not None) and progress.epoch < num_epochs:
                        guard.signal_name = guard.signal_name or "SIGTERM (on another process)"
                        raise Interrupted(f"{guard.signal_name} after epoch {progress.epoch}: checkpoint saved "
                                          f"in {workdir}; rerun the same command to resume")

            summary = job.finish(state, progress, checkpoints)
            log.confusion_matrix(os.path.join(workdir, "confusion_matrix.png"), len(progress.history))
        keep_checkpoints(config, checkpoints)
    job.check_result(summary)
    return summary
