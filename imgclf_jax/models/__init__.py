"""Models: the configurable branched CNN of the reference attempts (``../shared/seed-attempts.md``).

- :class:`BranchedCNN` / :func:`create_model`: the Flax linen module built from
  ``config.model`` and the number of classes; it returns logits.
- :func:`l2_penalty`: Keras's ``kernel_regularizer=l2(l)`` term over the conv and
  hidden dense kernels (not the output layer).
- :func:`layer_specs`: the analytic per-layer shapes, parameter counts and
  multiply-adds (used by ``imgclf_jax.summary``).
"""

from imgclf_jax.models.cnn import (
    LOGITS,
    BranchedCNN,
    LayerSpec,
    create_model,
    l2_penalty,
    layer_specs,
    regularized_kernels,
)

__all__ = [
    "LOGITS",
    "BranchedCNN",
    "LayerSpec",
    "create_model",
    "l2_penalty",
    "layer_specs",
    "regularized_kernels",
]
