"""A results table of finished runs: ``python -m imgclf_jax.results runs/a runs/b ...`` or ``... runs/``.

Each argument is a run's workdir (a folder with summary.json), or a folder
holding runs: then every run below it (any depth, sorted by path) that has a
summary.json is listed; a folder with none stops with one line.

Prints one Markdown row per workdir (from its config.json, summary.json and
history.json): parameters, best validation accuracy and its epoch, epochs run,
wall time, training images/s (steady state) and the training examples.
An ensemble's workdir gives one row per member (its best epoch, the epochs
it trained; the job's wall time and member-images/s) and one row per vote
(the result weights' majority and soft vote accuracies).
"""

from __future__ import annotations

import json
import os

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError

HEADER = ("| run | params | best val acc | best epoch | epochs run | wall time | train img/s | train examples |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")


def _load(workdir: str, name: str):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        raise ConfigError(f"'{workdir}' has no {name} (not a finished run)")
    with open(path) as f:
        return json.load(f)


def row(workdir: str) -> str:
    """One Markdown table row for a finished run's workdir."""
    summary, history = _load(workdir, "summary.json"), _load(workdir, "history.json")
    best = history[summary["best_epoch"] - 1]
    minutes = sum(h["seconds"] for h in history) / 60
    speed = summary.get("train_images_per_s")
    speed = "-" if speed is None else f"{speed:.1f}"  # None: one step per epoch, nothing steady
    return (f"| {os.path.basename(os.path.normpath(workdir))} | {summary['num_params']:,} | "
            f"{best['val_accuracy']:.4f} | {best['epoch']} | {len(history)} | {minutes:.1f} min | "
            f"{speed} | {summary.get('num_train_examples', '')} |")


def ensemble_rows(workdir: str) -> list[str]:
    """Markdown rows of a finished ensemble job: one per member, then the majority and soft votes."""
    summary, history = _load(workdir, "summary.json"), _load(workdir, "history.json")
    name = os.path.basename(os.path.normpath(workdir))
    minutes = sum(h["seconds"] for h in history) / 60
    speed = summary.get("member_images_per_s")
    speed = "-" if speed is None else f"{speed:.1f}"
    params, examples = f"{summary['num_params']:,}", summary.get("num_train_examples", "")
    out = []
    for i, member in enumerate(summary["members"]):
        acc = "-" if member["best_val_accuracy"] is None else f"{member['best_val_accuracy']:.4f}"
        out.append(f"| {name} member {i} (seed {member['seed']}) | {params} | {acc} | {member['best_epoch']} | "
                   f"{member['epochs_trained']} | {minutes:.1f} min | {speed} | {examples} |")
    for rule in ("majority", "soft"):
        out.append(f"| {name} {rule} vote | {summary['num_members']} x {params} | "
                   f"{summary['vote'][rule]['val_accuracy']:.4f} | - | {len(history)} | {minutes:.1f} min | "
                   f"{speed} | {examples} |")
    return out


def find_runs(path: str) -> list[str]:
    """The finished runs `path` names: itself if it holds summary.json, else every run below it.

    Returns:
      workdirs, sorted by path; a run's own subfolders are not searched.

    Raises:
      ConfigError: `path` does not exist, or no summary.json is in it or below it.
    """
    if os.path.isfile(os.path.join(path, "summary.json")):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"'{path}' not found (give a run's workdir or a folder of runs)")
    runs = []
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        if "summary.json" in files:
            runs.append(folder)
            subfolders.clear()  # checkpoints etc. of that run
    if not runs:
        raise ConfigError(f"'{path}' holds no finished run: no summary.json in it or in any folder below it")
    return sorted(runs)


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    paths = [word for word in argv if not word.startswith("-")]
    if not paths or len(paths) != len(argv):
        raise ConfigError("usage: python -m imgclf_jax.results WORKDIR_OR_FOLDER_OF_RUNS [...]")
    workdirs = [run for path in paths for run in find_runs(path)]
    print(HEADER)
    for workdir in workdirs:
        if "members" in _load(workdir, "summary.json"):
            print("\n".join(ensemble_rows(workdir)))
        else:
            print(row(workdir))
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.results")
