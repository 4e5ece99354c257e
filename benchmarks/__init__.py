"""Speed benchmarks of imgclf_jax, side by side with the Keras stack it replaces.

Run from the repository root (see ``benchmarks/README.md``)::

  python -m benchmarks.train_step      # images/s of a train step: imgclf_jax, Keras on TF, Keras on JAX
  python -m benchmarks.machine         # the hardware, and the GFLOP/s of a large float32 matmul
  python -m benchmarks.input_pipeline  # images/s of the grain pipeline per worker count
  python -m benchmarks.profile_step    # where the train step's time goes (per-layer conv gradients)
  bash benchmarks/gpu.sh WHEELS OUT    # all of the above on a CUDA machine, offline

Every tool prints JSON lines on stdout and progress on stderr. Numbers are
measured, never estimated; FLOP counts are analytic (see :mod:`benchmarks.flops`).
"""
