"""K members (seeds ``seed + i``) trained in one job with one compiled step, then voted.

- :mod:`.mapping`: how the step maps over members (vmap, unroll, lax.map) and the per-backend default.
- :mod:`.steps`: the stacked state and the K-member train/eval steps.
- :mod:`.voting`: majority (deterministic ties) and soft votes.
- :mod:`.job`: the job for the training driver: per-member early stopping and NaN freeze, votes, reports.
"""
