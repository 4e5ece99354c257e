"""Ensemble votes over member probabilities.

- Majority (hard) vote: each member votes for its argmax class; the class
  with the most votes wins. Ties are broken by the summed probabilities of the
  tied classes over all members (then by the lower class index), never at
  random: the reference line's attempt 3 broke ties at random
  (../shared/seed-attempts.md); here a rerun gives the same file.
- Soft vote: the argmax of the mean probability over members.

:data:`VOTES` is the ``ensemble.vote`` table (config validation checks names against it).
"""

from __future__ import annotations

import numpy as np

from imgclf_jax.registry import Registry

VOTES = Registry("ensemble.vote")  # name -> vote(probabilities float[K, N, C]) -> int64[N]


@VOTES.register("majority")
def majority_vote(probabilities: np.ndarray) -> np.ndarray:
    """int64[N] majority-vote classes.

    Args:
      probabilities: float[K, N, C], member k's class probabilities for example n.
    """
    k, n, c = probabilities.shape
    votes = np.zeros((n, c), np.int64)
    np.add.at(votes, (np.arange(n)[None, :].repeat(k, 0), probabilities.argmax(-1)), 1)
    summed = probabilities.sum(0)
    tied = votes == votes.max(-1, keepdims=True)
    return np.where(tied, summed, -np.inf).argmax(-1)


@VOTES.register("soft")
def soft_vote(probabilities: np.ndarray) -> np.ndarray:
    """int64[N] soft-vote classes: argmax of the mean probability over members (probabilities: float[K, N, C])."""
    return probabilities.mean(0).argmax(-1)


def vote(probabilities: np.ndarray, rule: str) -> np.ndarray:
    """int64[N] classes by `rule`, a :data:`VOTES` name ('majority' or 'soft'); probabilities: float[K, N, C].

    Raises:
      ConfigError: an unknown rule (the message lists the valid ones).
    """
    return VOTES[rule](probabilities)
