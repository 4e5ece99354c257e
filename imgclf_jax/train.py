"""Train a config: ``python -m imgclf_jax.train --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR] [--overwrite]``.

Writes into the workdir (default ``runs/NAME``): config.json, history.json
(after every epoch), summary.json, accuracy.png, loss.png,
confusion_matrix.{json,png}, submission.csv (when the data has a test split),
metrics.csv (Keras CSVLogger's layout), preview.png, tensorboard/ (event files:
``tensorboard --logdir runs``; :mod:`imgclf_jax.tracking`) and checkpoints/
(latest state for resuming, result params for predicting).
Rerunning the same command resumes an unfinished run.

With ``--config.ensemble.num_members=K`` (K > 1) it trains K members (seeds
seed..seed+K-1) in one job and also writes ``submission_member_<i>.csv``;
history.json, summary.json and the curves then cover every member and the
majority and soft votes (see README, "Ensembles"). With
``--config.ensemble.sweep='optimizer.learning_rate=0.1,0.2;model.l2=0,1e-4'`` it trains a
population: one member per combination (times num_members seeds) in one compiled step,
ranked at the end by best validation accuracy (see README, "Populations").

Data (config key data.builder; every key, with its default and meaning, is in
imgclf_jax/config.py, base_config; set one with --config.KEY=VALUE):
  competition  the Kaggle layout: train.csv, validation.csv (image_id,label),
               optional test.csv, and image folders train/, validation/,
               test/ (configs/ml*.py). Keys: data.dir, data.num_classes
               (ml*.py: 5; a label outside 0..num_classes-1 stops; 0 = infer).
  folders      one folder per class, your own data: DIR/<class>/<image>, or
               DIR/train/<class>/... with validation/ (or val/, valid/) and
               test/ (flat: unlabeled, predicted into submission.csv; a class
               tree: labelled, the validation split if there is no other).
               Keys: data.dir, data.num_classes (0 = the class folders).
               Template: configs/folders.py.
  digits       scikit-learn's bundled 8x8 digits, no download
               (configs/digits.py); data.dir must be ''.
  Every builder: data.image_size, data.resize_method, data.cache_dir,
  data.val_fraction and data.split_seed (the held-out validation split, used
  only when the data has none), data.max_train_examples, data.max_val_examples.
"""

from __future__ import annotations

import contextlib
import os

from imgclf_jax import cli


def _speed(images_per_s, what: str) -> str:
    return (f"{images_per_s:,.0f} {what} img/s" if images_per_s
            else "speed not measured (one step per epoch: compilation only)")


def summary_lines(summary: dict, workdir: str, written: list[str]) -> list[str]:
    """The run's outcome for people (train's last lines): best epoch, result, speed, the files written.

    `summary` is summary.json's dict (plain or ensemble); `written` the names of the run's files in `workdir`.
    """
    minutes = summary["wall_seconds"] / 60
    if "members" in summary:
        members = summary["members"]
        best = ", ".join("-" if m["best_val_accuracy"] is None else f"{m['best_val_accuracy']:.4f} (epoch "
                         f"{m['best_epoch']})" for m in members)
        vote = summary["vote"]
        peak = vote.get(vote["rule"], {}).get("per_epoch_best")  # majority and soft only
        peak = (f"; the per-epoch {vote['rule']} vote peaked at {peak['val_accuracy']:.4f} (epoch {peak['epoch']})"
                if peak else "")
        at = vote.get("result", {}).get("members_at", "their best epochs")
        first = (f"{summary['num_members']} members, best val_accuracy {best}; result: "
                 f"{vote['rule']} vote of the members at {at} {summary['result_val_accuracy']:.4f} "
                 f"(majority {vote['majority']['val_accuracy']:.4f}, soft {vote['soft']['val_accuracy']:.4f})"
                 f"{peak}; {_speed(summary['member_images_per_s'], 'member')}; {minutes:.1f} min")
    else:
        first = (f"best val_accuracy {summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']} of "
                 f"{summary['epochs_run']}{' (stopped early)' if summary['stopped_early'] else ''}; result "
                 f"({summary['result_weights']} weights) val_accuracy {summary['result_val_accuracy']:.4f}; "
                 f"{_speed(summary['train_images_per_s'], 'train')}; {minutes:.1f} min")
    if summary.get("test_accuracy") is not None:  # a labelled test split (scored with the result weights)
        first += f"; test accuracy {summary['test_accuracy']:.4f} ({summary['num_test_examples']:,} images)"
    shown = ",".join(f"{name}/" if os.path.isdir(os.path.join(workdir, name)) else name for name in written)
    return [first, *ranking_lines(summary), f"wrote {os.path.join(workdir, '')}{{{shown}}} (figures: summary.json)"]


def ranking_lines(summary: dict) -> list[str]:
    """A population's members ranked by best validation accuracy, one line each with its values ([] otherwise)."""
    sweep = summary.get("sweep")
    if not sweep:
        return []
    lines = ["population ranking (best val_accuracy first):"]
    for place, r in enumerate(sweep["ranking"], start=1):
        values = ", ".join(f"{key}={r['values'][key]:g}" for key in sweep["keys"])
        best = "-" if r["best_val_accuracy"] is None else f"{r['best_val_accuracy']:.4f} (epoch {r['best_epoch']})"
        lines.append(f"  {place}. member {r['member']} (seed {r['seed']}; {values}): {best}")
    return lines


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    args = cli.parse_args(argv, {"overwrite": bool})
    from imgclf_jax import distributed  # jax is imported only after the command line is known to be good

    if distributed.initialize(args.config):  # before anything starts a jax backend
        distributed.check_same_config(args.config, args.workdir)
    from imgclf_jax import loop
    from imgclf_jax import workdir as workdir_lib

    with contextlib.ExitStack() as quiet:
        if not distributed.is_primary():  # process 0 speaks for the run; an error still reaches stderr (cli.run)
            devnull = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(devnull))
            quiet.enter_context(contextlib.redirect_stderr(devnull))
        summary = loop.train_and_evaluate(args.config, args.workdir, overwrite=args.extras["overwrite"])
        print("\n".join(summary_lines(summary, args.workdir, workdir_lib.run_files(args.workdir))))
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.train")
