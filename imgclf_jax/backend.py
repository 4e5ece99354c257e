"""Backend policy: whether the CPU fast path is on, and the XLA:CPU flag that goes with it.

The kernels live in :mod:`imgclf_jax.models.fast_path`; this module only decides
where they are used, and sets XLA's flags. It imports no jax at module level (nor
:mod:`imgclf_jax.config`, which takes :data:`SETTINGS` from here), so the tools
can call :func:`configure_xla` before anything starts jax's backends.

One place decides (:func:`enabled`): ``config.model.fast_path`` is 'auto' (on
for the CPU backend, off elsewhere: on GPU, cuDNN's kernels already win),
'on' or 'off'; the environment variable ``IMGCLF_JAX_FAST_PATH=0`` turns it
off whatever the config says (``=1`` turns it on). The results do not change:
every fast op computes the same values and gradients as the op it replaces
(see :mod:`imgclf_jax.models.fast_path` and tests/test_fast_path.py), so a run
may switch between them and resume.

And one XLA:CPU setting, :data:`XLA_CPU_FLAG` (``XLA_FLAGS``, so it must be set
before jax starts its backends; :func:`configure_xla` does that for the
command-line tools): convolutions go to XLA's Eigen kernels instead of
YNNPACK (jaxlib 0.12's default). With YNNPACK, conv kernel gradients ran at
about 50 GFLOP/s on the 2-core EPYC (ml6's 5x5 32->70 layer: 1.19 s); with
Eigen at about 220 (0.27 s), forwards and input gradients about as before.
Dots stay on YNNPACK. The flag only affects the CPU compiler.
"""

from __future__ import annotations

import os

ENV = "IMGCLF_JAX_FAST_PATH"
SETTINGS = ("auto", "on", "off")  # the values of config.model.fast_path


def _env_setting() -> bool | None:
    """``IMGCLF_JAX_FAST_PATH``: True (1/on), False (0/off) or None (unset).

    Raises:
      ValueError: any other value.
    """
    env = os.environ.get(ENV, "").strip().lower()
    if not env:
        return None
    if env in ("0", "off", "false", "no"):
        return False
    if env in ("1", "on", "true", "yes"):
        return True
    raise ValueError(f"environment variable {ENV}={env!r}: expected 0 (off) or 1 (on)")


def enabled(setting: str = "auto", backend: str | None = None) -> bool:
    """Whether the fast path is used: the env var, then the config `setting`, then the backend.

    Args:
      setting: ``config.model.fast_path``: 'auto' (on for 'cpu'), 'on' or 'off'.
      backend: the jax backend name (default: ``jax.default_backend()``, which starts the backends).

    Raises:
      ValueError: an unknown `setting` or value of ``IMGCLF_JAX_FAST_PATH``.
    """
    forced = _env_setting()
    if forced is not None:
        return forced
    if setting not in SETTINGS:
        raise ValueError(f"fast_path setting {setting!r}: expected one of {SETTINGS}")
    if setting != "auto":
        return setting == "on"
    if backend is None:
        import jax

        backend = jax.default_backend()
    return backend == "cpu"


XLA_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def configure_xla(setting: str = "auto") -> bool:
    """Adds :data:`XLA_CPU_FLAG` to ``XLA_FLAGS`` when the fast path may be on; returns whether it did.

    Call before jax starts its backends (the tools call it before importing jax's users).
    It is left out when ``IMGCLF_JAX_FAST_PATH=0``, when `setting` is 'off', when
    ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type`` (the user's
    choice wins), or when jax's backends are already running (then it would not apply).
    On non-CPU backends the flag changes nothing.
    """
    if _env_setting() is False or setting == "off":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        pass
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
    return True
