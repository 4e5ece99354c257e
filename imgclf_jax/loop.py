"""The run: workdir -> parts (data, model, optimizer, mesh, memory check) -> job -> driver.

One call of :func:`train_and_evaluate` trains a config in a workdir: it takes
the workdir's lock, checks the workdir (:mod:`imgclf_jax.workdir`), builds the
run's parts (:func:`prepare_run`), chooses the job (here, and only here: a plain
run or a K-member ensemble) and hands it to the training driver
(:func:`imgclf_jax.driver.train`), which resumes, trains, checkpoints and
writes the history; the job writes its reports.
"""

from __future__ import annotations

import contextlib
import os

import ml_collections

from imgclf_jax import distributed, driver, memory, parallel, report, steps, workdir_lock
from imgclf_jax.data import device_augment, pipeline, splits
from imgclf_jax.ensemble import population
from imgclf_jax.ensemble.job import EnsembleJob
from imgclf_jax.job import RunParts
from imgclf_jax.models import create_model, layer_specs
from imgclf_jax.optim import create_optimizer
from imgclf_jax.plain import PlainJob
from imgclf_jax.workdir import check_workdir, check_workdir_place


def prepare_run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> RunParts:
    """What every training job needs first: checks the workdir and the model's fit, loads the data,
    builds the model, the optimizer and the device mesh, checks the memory of
    ``ensemble.num_members`` members (1 for a plain run), then writes config.json.

    config.json is written last, so a run refused by any of these checks leaves
    nothing behind that would make the corrected command look like "another config".

    Raises:
      ConfigError, DataError: bad config, workdir or data; a model that does not fit the image or memory.
    """
    primary = distributed.is_primary()
    # A multi-process run's workdir is process 0's to check, clear and write; it prepares the data first,
    # the others then find it in the shared cache. A refusal on any process stops them all (together).
    distributed.together("the workdir check", lambda: check_workdir(workdir, config, overwrite) if primary else None)
    layer_specs(config.model, config.data.image_size, 2)  # a model that fits the image, before any data work
    data = distributed.together("the data preparation", lambda: splits.load_run_data(config.data) if primary else None)
    data = distributed.together("reading the prepared data", lambda: data if data is not None else splits.load_run_data(config.data))
    loss_fn, batch_transform, eval_transform = steps.recipe_hooks(config, data.num_classes)
    model = create_model(config.model, data.num_classes)
    updates_per_epoch = pipeline.steps_per_epoch(data.train.labels, tuple(config.data.class_repeats),
                                                 config.train.batch_size)  # what the train pipeline has
    tx, schedule = create_optimizer(config.optimizer, steps_per_epoch=updates_per_epoch,
                                    num_epochs=config.train.num_epochs)
    mesh = parallel.make_mesh(config.train.batch_size)
    member = memory.member_memory(model, tx, config.model.l2, config.data.image_size,
                                  config.train.batch_size // mesh.size, config.train.ema_decay)
    data_bytes = (device_augment.table_bytes(len(data.train), config.data.image_size)
                  if config.data.get("on_device", False) else 0)
    figures = memory.check_fits(member, population.population_size(config), bool(config.train.early_stopping.monitor),
                                parallel.local_devices(mesh), config.data.image_size, data_bytes)
    report.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    return RunParts(data=data, model=model, tx=tx, schedule=schedule, mesh=mesh, memory=figures,
                    loss_fn=loss_fn, batch_transform=batch_transform, eval_transform=eval_transform)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> dict:
    """Trains `config` in `workdir` and writes every output; returns the summary dict.

    Resumes from the latest checkpoint of the workdir, which is written after
    every epoch and when SIGINT/SIGTERM arrives (mid-epoch, after the current
    step); a resumed run computes exactly what an uninterrupted one would.
    A config with ``ensemble.num_members > 1`` is an ensemble job
    (:class:`imgclf_jax.ensemble.job.EnsembleJob`), else a plain one
    (:class:`imgclf_jax.plain.PlainJob`).

    In a multi-process run (:mod:`imgclf_jax.distributed`) every process calls it with the same config;
    process 0 alone checks and writes the workdir and holds its lock.

    The workdir is locked for the whole call (:mod:`imgclf_jax.workdir_lock`): a second
    run on it, in this or another process, stops with WorkdirBusy (a ConfigError) before
    anything in the workdir is touched.

    Raises:
      ConfigError, DataError: bad config or data (before any training step).
      TrainingError: a NaN or infinite training loss, naming the step (the checkpoints stay intact).
      Interrupted: SIGINT or SIGTERM (after saving a checkpoint).
      ProcessLost: a multi-process run lost a process (its collectives failed); the checkpoints stay intact.
    """
    check_workdir_place(workdir, config)
    with contextlib.ExitStack() as locked:
        distributed.together("the workdir lock", lambda: locked.enter_context(workdir_lock.WorkdirLock(workdir))
                             if distributed.is_primary() else None)
        try:
            parts = distributed.together("start-up", lambda: prepare_run(config, workdir, overwrite))
            job_type = EnsembleJob if population.population_size(config) > 1 else PlainJob
            return driver.train(job_type(config, workdir, parts))
        except Exception as e:  # a multi-process run's collective failing because a process is gone
            lost = distributed.lost_process_error(e, config.distributed.heartbeat_timeout_s)
            if lost is None:
                raise
            raise lost from None
