"""Attempt 6 as the reference line ended it: 5 runs of the recipe, majority vote (../shared/seed-attempts.md).

Command:
  python -m imgclf_jax.train --config configs/ml6_ensemble.py --config.data.dir=PATH

Original (Keras/TensorFlow): several attempt-6 runs trained one by one, their
submissions merged by majority vote: about 90.9% Kaggle test accuracy.

Here: configs/ml6.py's recipe unchanged, with 5 members trained in one job
(seeds seed..seed+4, each its own init, dropout, data order and augmentation,
each its own early stopping on val_accuracy with patience 13), then a majority
vote (ties by summed probabilities). Memory: about 2.2 GiB per member at batch
32 on one CPU device, 11 GiB for the 5 (python -m imgclf_jax.summary --config
configs/ml6_ensemble.py prints the figures for the backend at hand).
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ml6.py")
    spec = importlib.util.spec_from_file_location("_ml6", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.ensemble.num_members = 5
    c.ensemble.vote = "majority"
    return c
