"""Bundled handwritten digits: the main job end to end with no download.

Command:
  python -m imgclf_jax.train --config configs/digits.py

Data: scikit-learn's 1,797 real 8x8 scans (10 classes), as RGB upscaled to
32x32, seeded stratified 80/20 split (1,437 train / 360 validation). Same
builder API, pipeline, model and loop as the reference configs; a small
two-conv CNN with light augmentation.
"""

from imgclf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.builder = "digits"
    c.data.dir = ""  # bundled with scikit-learn: no data folder
    c.data.image_size = 32
    c.data.val_fraction = 0.2
    c.augment.rotation_deg = 8.0
    c.augment.shift_fraction = 0.05
    c.model.conv_filters = (32, 64)
    c.model.conv_kernel_sizes = (3, 3)
    c.model.conv_paddings = ("same", "same")
    c.model.conv_pools = (True, True)
    c.model.conv_dropouts = (0.0, 0.1)
    c.model.dense_units = (128,)
    c.model.dense_dropouts = (0.2,)
    c.train.num_epochs = 15
    return c
