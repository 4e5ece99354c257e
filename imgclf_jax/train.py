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
