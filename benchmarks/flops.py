"""The FLOP convention of the benchmarks: analytic counts, never read from a profiler.

Forward FLOPs per image are :func:`imgclf_jax.summary.count_flops`'s (2 per
multiply-add of the conv and dense layers; bias, ReLU, pooling, dropout and
concatenation not counted). A train step counts 3 x that per image: the
forward pass, the gradient with respect to each layer's input and the
gradient with respect to each layer's kernel each cost one forward pass's
multiply-adds. The first conv's input gradient is counted although no
framework computes it (nothing upstream needs it), and the loss, L2 term and
optimizer update are not counted, so the figure slightly overstates the work
of a step: GFLOP/s built on it are comparable across frameworks, because
every framework is credited with the same count for the same model.
"""

from __future__ import annotations

from typing import Any

from imgclf_jax.summary import count_flops

TRAIN_FLOPS_PER_FORWARD = 3

TRAIN_FLOPS_CONVENTION = (
    "train step, per image: 3 x forward FLOPs of imgclf_jax.summary.count_flops (2 per multiply-add "
    "of conv and dense layers; forward + input gradient + kernel gradient); loss, L2 and optimizer "
    "update not counted"
)


def forward_flops_per_image(model_config: Any, image_size: int, num_classes: int) -> int:
    """Forward FLOPs of one image_size x image_size x 3 image (``imgclf_jax.summary.count_flops``)."""
    return count_flops(model_config, image_size, num_classes)


def train_flops_per_image(model_config: Any, image_size: int, num_classes: int) -> int:
    """FLOPs credited to one image of a train step: 3 x :func:`forward_flops_per_image`."""
    return TRAIN_FLOPS_PER_FORWARD * forward_flops_per_image(model_config, image_size, num_classes)


def conv_flops(batch: int, out_height: int, out_width: int, kernel: int, in_channels: int,
               out_channels: int) -> int:
    """FLOPs of one conv over a batch: 2 * B * H_out * W_out * k * k * C_in * C_out.

    The same count holds for its input gradient and its kernel gradient.
    """
    return 2 * batch * out_height * out_width * kernel * kernel * in_channels * out_channels
