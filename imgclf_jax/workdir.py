"""The workdir policy: where a run may write, what it writes, and when a workdir may be reused.

A workdir holds one run. :func:`check_workdir` refuses a workdir that holds a
run of another config (keys other than :data:`RESUMABLE_CHANGES` differ) unless
``--overwrite``, which removes the previous run's own files (:data:`RUN_FILES`,
per-member submissions) and nothing else. The lock that keeps two processes off
one workdir is :mod:`imgclf_jax.workdir_lock`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import ml_collections

from imgclf_jax import config as config_lib
from imgclf_jax.errors import ConfigError
from imgclf_jax.models.base import COMMON_KEYS

# Keys that may change between a run and its resumption without changing its results (train.num_epochs
# only when the schedule does not depend on the run's length: optim.ScheduleEntry.run_length).
RESUMABLE_CHANGES = ("train.num_epochs", "data.num_workers", "model.fast_path", "train.keep_checkpoints",
                     # a run checkpointed by N processes resumes with M (imgclf_jax.distributed)
                     "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id",
                     "distributed.heartbeat_timeout_s", "distributed.initialization_timeout_s")


def flat_config(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{dotted key: value}`` (tuples as lists, as config.json holds them)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


# What a run writes into its workdir; --overwrite removes these and nothing else.
RUN_FILES = ("config.json", "history.json", "summary.json", "accuracy.png", "loss.png",
             "confusion_matrix.json", "confusion_matrix.png", "submission.csv", "metrics.csv", "preview.png",
             "tensorboard", "checkpoints")
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
    old = flat_config(old)
    new = flat_config(json.loads(json.dumps(config.to_dict())))
    # A key added to the schema after the run started counts as its default there.
    defaults = flat_config(json.loads(json.dumps(config_lib.schema(config).to_dict())))  # of this config's model
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    differing = sorted(k for k in set(old) | set(new)
                       if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if "model.name" in differing:  # another model family: its own keys are not comparable, so not listed
        common = {f"model.{k}" for k in COMMON_KEYS}
        differing = [k for k in differing if not k.startswith("model.") or k in common]
    if differing:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differing)
        raise ConfigError(
            f"workdir '{workdir}' holds a run with another config: {shown}; "
            "use another --workdir, or --overwrite to replace it"
        )
    _check_run_length(workdir, config, old.get("train.num_epochs"))


def _check_run_length(workdir: str, config: ml_collections.ConfigDict, old_epochs: Any) -> None:
    """Refuses another train.num_epochs on resume when the schedule's rates depend on the run's length."""
    from imgclf_jax import optim  # here: jax is slow to import

    schedule = config.optimizer.schedule
    if old_epochs == config.train.num_epochs or not optim.SCHEDULES[schedule].run_length:
        return
    raise ConfigError(
        f"workdir '{workdir}' holds a run of train.num_epochs={old_epochs!r}, and optimizer.schedule="
        f"{schedule!r} sets its rates by the run's length: its updates so far followed the {old_epochs!r}-epoch "
        f"schedule, so train.num_epochs={config.train.num_epochs!r} cannot continue it; keep "
        f"train.num_epochs={old_epochs!r}, use another --workdir, or --overwrite to start again")
