"""The paragraph every train run prints first: what it trains on, with what, where, and from which state."""

from __future__ import annotations

import os

import numpy as np

from imgclf_jax.models import describe_model

MAX_CLASSES_SHOWN = 20  # more classes: the first ones, then how many more


def _processes(devices: list) -> str:
    """' of 2 processes' when the devices belong to more than one process (a multi-process run), else ''."""
    count = len({getattr(d, "process_index", 0) for d in devices})
    return f" of {count} processes" if count > 1 else ""


def _row_lines(data) -> list[str]:
    """'rows: train 1,437, validation 360, test none', or one line per split saying where its rows came from."""
    splits = (("train", data.train), ("validation", data.validation), ("test", data.test))
    if not data.sources:
        return ["  rows: " + ", ".join(f"{name} {len(split):,}" if split is not None else f"{name} none"
                                        for name, split in splits)]
    return [f"  {name}: {data.sources.get(name, f'{len(split):,} rows') if split is not None else 'none'}"
            for name, split in splits]


def _settings(entry_keys, section) -> str:
    """' (key value, ...)' of the entry's keys with the section's values, or '' for an entry without keys."""
    shown = ", ".join(f"{key} {section[key]!r}" for key in entry_keys)
    return f" ({shown})" if shown else ""


def recipe_line(config) -> str | None:
    """'  recipe: ...': the training techniques a run has on that the defaults do not (None: none).

    Names the optimizer when it is not the default one or has a key away from its default, the
    schedule when it is not 'constant', label smoothing when above 0 and the batch transform when
    one is chosen, each with the settings its entry reads (the keys of the chosen table entries); then
    the EMA decay, the eval transform (with its ``tta`` keys), augment ops other than the default ones
    and the per-channel normalization, when on.
    """
    from imgclf_jax import batch_transforms, config as config_lib, losses, optim

    o, base = config.optimizer, config_lib.base_config().optimizer
    optimizer, schedule = optim.OPTIMIZERS[o.name], optim.SCHEDULES[o.schedule]
    parts = []
    if o.name != base.name or any(o[key] != base[key] for key in ("learning_rate", *optimizer.keys)):
        parts.append(f"optimizer '{o.name}' (learning_rate {o.learning_rate!r}"
                     + "".join(f", {key} {o[key]!r}" for key in optimizer.keys) + ")")
    if o.schedule != base.schedule:
        parts.append(f"schedule '{o.schedule}'{_settings(schedule.keys, o)}")
    loss = losses.LOSSES[config.loss.name]
    if config.loss.name != losses.DEFAULT or any(config.loss[key] != d for key, d in loss.keys.items()):
        parts.append(f"loss '{config.loss.name}'{_settings(loss.keys, config.loss)}")
    transform = batch_transforms.BATCH_TRANSFORMS[config.train.batch_transform]
    if transform is not None:
        parts.append(f"batch transform '{config.train.batch_transform}'"
                     f"{_settings(transform.keys, config[batch_transforms.SECTION])}")
    if config.train.ema_decay > 0:
        parts.append(f"EMA weights (decay {config.train.ema_decay!r})")
    if config.train.eval_transform:
        from imgclf_jax import eval_transforms

        entry = eval_transforms.EVAL_TRANSFORMS[config.train.eval_transform]
        keys = getattr(entry, "keys", {}) or {}
        parts.append(f"eval transform '{config.train.eval_transform}'{_settings(keys, config.tta)}")
    if tuple(config.augment.ops) != tuple(config_lib.base_config().augment.ops):
        parts.append("augment ops " + ", ".join(config.augment.ops))
    if config.data.channel_mean:
        parts.append(f"per-channel normalization (mean {tuple(config.data.channel_mean)}, "
                     f"std {tuple(config.data.channel_std)})")
    return "  recipe: " + "; ".join(parts) if parts else None


def start_banner(config, workdir: str, data, num_params: int, devices: list, start: str) -> str:
    """The start paragraph (a few lines, no trailing newline).

    Args:
      config: the run's config; data: the run's :class:`imgclf_jax.data.splits.RunData` (its
        ``sources`` say where each split came from, when the builder filled them);
      num_params: parameters of the model (of one member in an ensemble);
      devices: the mesh's devices; start: "fresh run", "resuming at epoch ..." or the like.

    A ``recipe:`` line (:func:`recipe_line`) comes before the workdir line when the run has a
    technique on that the defaults do not (another optimizer or schedule, label smoothing, MixUp ...).
    """
    d = config.data
    path = d.dir or "none (bundled data)"
    from imgclf_jax.data import packed

    # a packed folder (python -m imgclf_jax.pack read) holds its prepared data itself: data.cache_dir is unused
    root = d.dir if d.dir and packed.is_packed(d.dir) else d.cache_dir
    prepared = os.path.join(root, data.fingerprint) if data.fingerprint else root
    counts = np.bincount(np.asarray(data.train.labels)[np.asarray(data.train.labels) >= 0],
                         minlength=data.num_classes)
    shown = [f"{name} {int(n):,}" for name, n in zip(data.class_names, counts)]
    if len(shown) > MAX_CLASSES_SHOWN:
        shown = shown[:MAX_CLASSES_SHOWN] + [f"... ({len(shown) - MAX_CLASSES_SHOWN} more)"]
    from imgclf_jax.data import placement
    from imgclf_jax.ensemble import population

    k = population.population_size(config)
    members = f" per member, {k} members" if k > 1 else ""
    per_device = config.train.batch_size // max(len(devices), 1)
    device_text = ", ".join(str(x) for x in devices[:4]) + (f", ... ({len(devices)})" if len(devices) > 4 else "")
    return "\n".join([
        f"train: builder '{d.builder}', data.dir {path}, prepared in {prepared}",
        *_row_lines(data),
        f"  classes ({data.num_classes}; train rows each): {', '.join(shown)}",
        f"  images {d.image_size}x{d.image_size} RGB; model {describe_model(config.model)}, {num_params:,} params"
        f"{members}; batch {config.train.batch_size} on {len(devices)} device(s){_processes(devices)} ({device_text}; "
        f"{per_device} each); {placement.describe(config)}",
        *([recipe] if (recipe := recipe_line(config)) else []),
        f"  workdir {workdir}: {start}",
    ])
