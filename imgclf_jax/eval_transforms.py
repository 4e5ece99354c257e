"""Evaluation-time transforms by name (config key ``train.eval_transform``; '' = off, the default).

An eval transform wraps the forward pass of the eval step (validation, test and
predict): ``fn(apply_logits, images) -> logits``, where
``apply_logits(images float32[N, H, W, 3]) -> float32[N, C]`` runs the model with
dropout off and ``images`` is the batch's ``float32[B, H, W, 3]``. It returns
``float32[B, C]`` logits; the eval step's loss and probabilities are computed
from them as without a transform. Test-time augmentation averages views this
way.

Adding one::

    from imgclf_jax.eval_transforms import EVAL_TRANSFORMS

    @EVAL_TRANSFORMS.register("my_tta")
    def my_tta(apply_logits, images): ...

then ``--config.train.eval_transform=my_tta``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from imgclf_jax.registry import Registry

ApplyLogits = Callable[[jax.Array], jax.Array]
EvalTransformFn = Callable[[ApplyLogits, jax.Array], jax.Array]

EVAL_TRANSFORMS = Registry("train.eval_transform", off="")


@EVAL_TRANSFORMS.register("horizontal_flip_tta")
def horizontal_flip_tta(apply_logits: ApplyLogits, images: jax.Array) -> jax.Array:
    """Test-time augmentation over the image and its mirror (columns reversed).

    Returns ``log((softmax(a) + softmax(b)) / 2)``, float32[B, C], with a, b the logits of the
    two views: log-probabilities whose softmax is the mean of the two softmaxes (computed as a
    logsumexp of the two log-softmaxes, so a probability that underflows stays finite). The
    cross-entropy of the eval step is then that of the mean probabilities.
    """
    a = jax.nn.log_softmax(apply_logits(images).astype(jnp.float32), axis=-1)
    b = jax.nn.log_softmax(apply_logits(images[:, :, ::-1]).astype(jnp.float32), axis=-1)
    return jnp.logaddexp(a, b) - jnp.log(jnp.float32(2.0))
