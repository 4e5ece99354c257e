"""Attempt 2: dropout and early stopping on validation loss (../shared/seed-attempts.md).

Command:
  python -m imgclf_jax.train --config configs/ml2.py --config.data.dir=PATH

Original (Keras/TensorFlow): Kaggle test accuracy about 82%.

Recipe: no augmentation. Conv 32 3x3 same, MaxPool, Dropout 0.1, Conv 64 5x5
same, MaxPool, Dropout 0.2, Conv 128 3x3 same, MaxPool, Dropout 0.3, Flatten,
Dense 128, Dropout 0.4, Dense 64, Dropout 0.1, Dense 5 softmax (ReLU
everywhere). Keras Adam lr 1e-3, batch 32, up to 10 epochs, EarlyStopping on
val_loss with patience 3, best weights restored.
"""

from imgclf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.num_classes = 5  # the competition's classes 0..4; a label outside them stops before training
    c.model.conv_filters = (32, 64, 128)
    c.model.conv_kernel_sizes = (3, 5, 3)
    c.model.conv_paddings = ("same", "same", "same")
    c.model.conv_pools = (True, True, True)
    c.model.conv_dropouts = (0.1, 0.2, 0.3)
    c.model.dense_units = (128, 64)
    c.model.dense_dropouts = (0.4, 0.1)
    c.train.num_epochs = 10
    c.train.early_stopping.monitor = "val_loss"
    c.train.early_stopping.patience = 3
    return c
