"""A results table of finished runs: ``python -m imgclf_jax.results runs/a runs/b ...`` or ``... runs/``.

Each argument is a run's workdir (a folder with summary.json), or a folder
holding runs: then every run below it (any depth, sorted by path) that has a
summary.json is listed; a folder with none stops with one line. A file (e.g.
``runs/a/summary.json``) is refused with one line naming the workdir to give.

A named workdir whose summary.json / history.json is damaged (not JSON, keys
missing) stops with one line naming the file; in a folder of runs such a run is
skipped with one warning line on stderr naming it, and the rest are listed.

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
import sys

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError

HEADER = ("| run | params | best val acc | best epoch | epochs run | wall time | train img/s | train examples |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")


def _load(workdir: str, name: str):
    """The parsed JSON file `name` of `workdir`; raises ConfigError (naming the file) if missing or damaged."""
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        raise ConfigError(f"'{workdir}' has no {name} (not a finished run)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{path}' is damaged ({type(e).__name__}: {e}); the run's results cannot be read "
                          "from it") from None


def rows(workdir: str) -> list[str]:
    """The Markdown rows of one finished run (ensemble_rows or row).

    Raises:
      ConfigError: its summary.json or history.json is missing, not JSON, or lacks the keys read.
    """
    try:
        if "members" in _load(workdir, "summary.json"):
            return ensemble_rows(workdir)
        return [row(workdir)]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"'{workdir}' has a damaged summary.json or history.json ({type(e).__name__}: {e}); "
                          "the run's results cannot be read from them") from None


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
    """Markdown rows of a finished ensemble job: one per member, then each vote rule's (majority, soft, ...)."""
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
    for rule in [r for r in summary["vote"] if r not in ("rule", "result")]:  # majority, soft, any other rule
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
    if os.path.isfile(path):
        raise ConfigError(f"'{path}' is a file; give the run's workdir (the folder holding summary.json, "
                          f"here '{os.path.dirname(path) or '.'}') or a folder of runs")
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
    found = [(run, run == path) for path in paths for run in find_runs(path)]  # (workdir, named itself)
    table = []
    for workdir, named in found:  # read every run before printing: a named damaged run prints no header
        try:
            table += rows(workdir)
        except ConfigError as e:
            if named:
                raise
            print(f"imgclf_jax.results: warning: skipped '{workdir}': {e}", file=sys.stderr)
    if not table:
        raise ConfigError("no run could be read: every run found was skipped (see the warnings above)")
    print(HEADER)
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.results")
