"""Attempt 1: small baseline CNN, no augmentation, 10 epochs (../shared/seed-attempts.md).

Command:
  python -m imgclf_jax.train --config configs/ml1.py --config.data.dir=PATH

Original (Keras/TensorFlow): Kaggle test accuracy about 78%; validation accuracy
peaked near 79% while training accuracy reached about 98% (overfitting).

Recipe: Conv 32 3x3 valid ReLU, MaxPool, Conv 64 3x3 valid ReLU, MaxPool,
Conv 128 3x3 valid ReLU, MaxPool, Flatten, Dense 256 ReLU, Dense 5 softmax;
Keras Adam lr 1e-3 (eps 1e-7 on the uncorrected root), batch 32, 10 epochs,
no early stopping (the final weights are the result); 100x100 images resized
to 128x128 nearest, scaled to [0, 1].
"""

from imgclf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.num_classes = 5  # the competition's classes 0..4; a label outside them stops before training
    c.model.conv_filters = (32, 64, 128)
    c.model.conv_kernel_sizes = (3, 3, 3)
    c.model.conv_paddings = ("valid", "valid", "valid")
    c.model.conv_pools = (True, True, True)
    c.model.conv_dropouts = (0.0, 0.0, 0.0)
    c.model.dense_units = (256,)
    c.model.dense_dropouts = (0.0,)
    c.train.num_epochs = 10
    return c
