"""Train a config: ``python -m imgclf_jax.train --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR] [--overwrite]``.

Writes into the workdir (default ``runs/NAME``): config.json, history.json
(after every epoch), summary.json, accuracy.png, loss.png,
confusion_matrix.{json,png}, submission.csv (when the data has a test split)
and checkpoints/ (latest state for resuming, result params for predicting).
Rerunning the same command resumes an unfinished run.

With ``--config.ensemble.num_members=K`` (K > 1) it trains K members (seeds
seed..seed+K-1) in one job and also writes ``submission_member_<i>.csv``;
history.json, summary.json and the curves then cover every member and the
majority and soft votes (see README, "Ensembles").

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

import json

from imgclf_jax import cli


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    args = cli.parse_args(argv, {"overwrite": bool})
    from imgclf_jax import loop  # jax is imported only after the command line is known to be good

    summary = loop.train_and_evaluate(args.config, args.workdir, overwrite=args.extras["overwrite"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.train")
