"""Your own images, one folder per class: a template to copy and edit.

Command:
  python -m imgclf_jax.train --config configs/folders.py --config.data.dir=PATH

Data: PATH/<class>/<image> (10% of each class held out for validation,
seeded by data.split_seed), or PATH/train/<class>/... with a validation tree
PATH/validation/ (or val/, valid/) and optionally PATH/test/ (a flat folder of
unlabeled images, predicted into submission.csv with the class folder names;
or a class tree: labelled). Class names are the sorted folder names; images
of any size and mode Pillow reads are converted to RGB and resized to 64x64.

Model: a small CNN (three 3x3 'same' conv layers of 32, 64, 128 filters, each
max-pooled, dropout, one dense layer of 128), light augmentation, Keras Adam
lr 1e-3, up to 30 epochs with early stopping on validation loss (patience 5;
the best epoch's weights are the result).
"""

from imgclf_jax.config import base_config


def get_config():
    c = base_config()
    c.data.builder = "folders"
    c.data.dir = "data/my_images"  # replace, or pass --config.data.dir=PATH
    c.data.num_classes = 0  # 0 = as many as the class folders; set it to check their number
    c.data.image_size = 64
    c.data.resize_method = "bilinear"
    c.data.val_fraction = 0.1  # only when there is no validation tree
    c.augment.rotation_deg = 10.0
    c.augment.shift_fraction = 0.1
    c.augment.zoom_fraction = 0.1
    c.augment.horizontal_flip = True  # turn off for images whose left and right differ in meaning
    c.model.conv_filters = (32, 64, 128)
    c.model.conv_kernel_sizes = (3, 3, 3)
    c.model.conv_paddings = ("same", "same", "same")
    c.model.conv_pools = (True, True, True)
    c.model.conv_dropouts = (0.0, 0.1, 0.2)
    c.model.dense_units = (128,)
    c.model.dense_dropouts = (0.3,)
    c.train.num_epochs = 30
    c.train.early_stopping.monitor = "val_loss"
    c.train.early_stopping.patience = 5
    return c
