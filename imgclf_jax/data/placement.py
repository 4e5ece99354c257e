"""Where a run augments: ``data.augment_on`` ('auto' | 'host' | 'device') resolved per backend.

'auto' (the default) is 'host' on CPU and 'device' on a GPU or TPU. On the 2-core CPU the jitted path
made batches 2.3x faster but trained the main job only 1.03x faster (within noise), and the host path
is the exact scipy call of the Keras recipe, so a CPU keeps it (README, "Augmentation on the device");
a GPU's host side cannot feed it (670-1,300 warped images/s on this project's 2-core CPU); always 'device' with
``data.on_device=true``; always 'host' when an op that is on has no device half. The choice is printed
at start-up and written to summary.json (``augment_on``). See :mod:`imgclf_jax.data.device_augment`.
"""

from __future__ import annotations

from imgclf_jax.data.augment import AugmentParams
from imgclf_jax.errors import ConfigError

AUGMENT_ON = ("auto", "host", "device")


def check(data_config) -> None:
    """Raises ConfigError for an unknown ``data.augment_on`` or ``data.on_device=true`` with 'host'
    (absent keys, as in a config.json saved before they existed, mean 'auto' and false)."""
    value = data_config.get("augment_on", "auto")
    if value not in AUGMENT_ON:
        raise ConfigError(f"config key 'data.augment_on' must be one of {AUGMENT_ON}, got {value!r}")
    if data_config.get("on_device", False) and value == "host":
        raise ConfigError("config key 'data.on_device' is true (the training images live on the device) "
                          "but data.augment_on is 'host': set --config.data.augment_on=device (or auto)")


def resolve(data_config, backend: str | None = None, recipe: AugmentParams | None = None) -> str:
    """'host' or 'device': where this run augments (module docstring).

    Args:
      data_config: the ``data`` section (``augment_on``, ``on_device``; absent keys, as in a config.json
        saved before they existed, mean 'auto' and false).
      backend: ``jax.default_backend()`` when None ('cpu', 'gpu', 'tpu', ...).
      recipe: the ``augment`` section; 'auto' stays on the host when an op that is on has no device half
        (None: not checked).

    Raises:
      ConfigError: ``data.on_device=true`` with ``data.augment_on='host'`` (the host would need the pixels),
        or an unknown ``data.augment_on``.
    """
    check(data_config)
    value = data_config.get("augment_on", "auto")
    if data_config.get("on_device", False):
        return "device"
    if value != "auto":
        return value
    if recipe is not None and recipe.host_only_ops():
        return "host"
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "host" if backend == "cpu" else "device"


def describe(config) -> str:
    """A few words for the start banner: where the run augments, and whether the split is in device memory."""
    recipe = AugmentParams(**config.augment.to_dict())
    where = resolve(config.data, recipe=recipe)
    text = f"augmentation on the {where}" if recipe.active else "no augmentation"
    if config.data.get("on_device", False):
        text += ", training split in device memory"
    return text
