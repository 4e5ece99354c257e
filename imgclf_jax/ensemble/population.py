"""Hyperparameter populations: one member per combination of swept values, all in one compiled step.

``ensemble.sweep`` names numeric config keys and a list of values for each, as
``'optimizer.learning_rate=0.01,0.001;model.l2=0,1e-5'`` (``;`` between keys, ``,``
between values; key names as in the schema). The job trains one member per
combination of the lists (their product, the first key varying slowest), times
``ensemble.num_members`` seeds: member ``m = c * num_members + s`` has combination
c and seed ``seed + s``, so every combination is trained on the same seeds (the
same initial weights and batches: differences come from the values). Without a
sweep the members are the ensemble's, seeds ``seed + i``.

The swept values enter the one compiled step as per-member arrays (``float32[K]``
per key, :func:`member_values`), mapped over the member axis like the states, so
the program is compiled once whatever the values: :func:`member_hooks` builds each
member's optimizer, L2 factor, loss and batch transform from its values inside the
traced step. Member m computes what the plain run of its config
(:func:`member_config`: the values and seed set) computes, to float rounding (the
values are runtime numbers there, constants in the plain run).

:data:`SWEEPABLE` lists the keys that can be swept: they change numbers, not shapes
or the program. Any other key (filters, kernel sizes, the model or optimizer name,
epochs, batch size, ...) is refused with one line.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from typing import Any, Callable

import ml_collections

from imgclf_jax.errors import ConfigError

SWEEPABLE = {
    "optimizer.learning_rate": "the peak (or constant) learning rate; the schedule's shape is shared",
    "optimizer.weight_decay": "decoupled weight decay (optimizer 'sgd' or 'adamw')",
    "model.l2": "Keras-style L2 factor on the kernels (a loss term)",
    "loss.label_smoothing": "label smoothing eps",
    "mixing.probability": "the chance a batch is mixed (train.batch_transform mixup/cutmix/mixup_cutmix)",
    "mixing.alpha": "MixUp/CutMix's Beta(alpha, alpha) parameter",
    "model.conv_dropouts[i]": "the dropout rate after conv layer i (model 'branched_cnn'; i from 0)",
    "model.dense_dropouts[i]": "the dropout rate after hidden dense layer i (model 'branched_cnn')",
}
"""Key -> what it is, for the keys ``ensemble.sweep`` accepts. ``[i]`` keys name one element of a
tuple key (``model.dense_dropouts[0]``); a swept dropout layer exists in every member, and at rate 0 it
returns its input exactly (:class:`imgclf_jax.models.cnn.FastDropout`), as the plain run without it."""

_MODEL_KEYS = ("model.conv_dropouts", "model.dense_dropouts")  # swept ones rebuild the member's model


def split_index(key: str) -> tuple[str, int | None]:
    """``'model.dense_dropouts[1]'`` -> ``('model.dense_dropouts', 1)``; ``'model.l2'`` -> ``('model.l2', None)``.

    Raises:
      ConfigError: a ``[...]`` that is not a non-negative integer index at the key's end.
    """
    if "[" not in key and "]" not in key:
        return key, None
    base, bracket, rest = key.partition("[")
    if not bracket or not rest.endswith("]") or not rest[:-1].isdigit() or "[" in rest[:-1]:
        raise ConfigError(f"ensemble.sweep: '{key}' is not KEY or KEY[i] (i an integer from 0, "
                          "e.g. 'model.dense_dropouts[0]')")
    return base, int(rest[:-1])


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _sweepable(key: str) -> bool:
    base, index = split_index(key)
    return (base + "[i]" if index is not None else base) in SWEEPABLE


def _set(tree: Any, key: str, value: Any, cast: bool) -> None:
    """Sets `key` ('a.b' or 'a.b[i]') of a ConfigDict or nested dict to `value` (cast to the old type
    when `cast`; a tuple element replaced in a new tuple)."""
    base, index = split_index(key)
    *path, name = base.split(".")
    node = tree
    for part in path:
        node = node[part]
    if index is None:
        node[name] = type(node[name])(value) if cast else value
    else:
        old = list(node[name])
        old[index] = type(old[index])(value) if cast else value
        node[name] = tuple(old)


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a population: its run seed and its swept values (key -> float; {} without a sweep)."""

    seed: int
    values: dict


def parse_sweep(text: str) -> list[tuple[str, list[float]]]:
    """``'a.b=1,2;c.d=3,4'`` -> ``[('a.b', [1.0, 2.0]), ('c.d', [3.0, 4.0])]``; '' -> [].

    Raises:
      ConfigError: naming ``ensemble.sweep`` and the part at fault: a part without '=', a key
        given twice, an empty or non-numeric value, a value given twice, a non-finite value.
    """
    out, seen = [], set()
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        key, eq, values = (s.strip() for s in part.partition("="))
        if not eq or not key:
            raise ConfigError(f"ensemble.sweep: '{part}' is not KEY=V1,V2,... (keys separated by ';', "
                              "e.g. 'optimizer.learning_rate=0.01,0.001;model.l2=0,1e-5')")
        if key in seen:
            raise ConfigError(f"ensemble.sweep: key '{key}' is given twice")
        seen.add(key)
        numbers = []
        for word in (w.strip() for w in values.split(",")):
            try:
                number = float(word)
            except ValueError:
                raise ConfigError(f"ensemble.sweep: '{key}' value {word!r} is not a number") from None
            if not math.isfinite(number):
                raise ConfigError(f"ensemble.sweep: '{key}' value {word!r} is not finite")
            if number in numbers:
                raise ConfigError(f"ensemble.sweep: '{key}' lists the value {word} twice")
            numbers.append(number)
        out.append((key, numbers))
    return out


def members(config: ml_collections.ConfigDict) -> list[Member]:
    """The job's members in order (see the module docstring); ``[Member(seed + i, {})]`` without a sweep."""
    sweep = parse_sweep(config.ensemble.get("sweep", ""))
    seeds = [config.seed + s for s in range(config.ensemble.num_members)]
    if not sweep:
        return [Member(seed, {}) for seed in seeds]
    keys = [key for key, _ in sweep]
    return [Member(seed, dict(zip(keys, combo)))
            for combo in itertools.product(*(values for _, values in sweep)) for seed in seeds]


def population_size(config: ml_collections.ConfigDict) -> int:
    """K: the number of members the job trains (``ensemble.num_members`` times the sweep's combinations).

    Counted without listing the members: the memory check must refuse a huge K at once.
    """
    return config.ensemble.num_members * math.prod(
        len(values) for _, values in parse_sweep(config.ensemble.get("sweep", "")))


def swept_keys(config: ml_collections.ConfigDict) -> list[str]:
    """The keys ``ensemble.sweep`` names, in its order ([] without a sweep)."""
    return [key for key, _ in parse_sweep(config.ensemble.get("sweep", ""))]


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
    """The plain run's config that `member` equals: the values set, ``seed`` its seed, no ensemble, no sweep."""
    out = copy.deepcopy(config)
    with out.unlocked():
        for key, value in member.values.items():
            _set(out, key, value, cast=True)
        out.seed = member.seed
        out.ensemble.num_members = 1
        out.ensemble.sweep = ""
    return out


def _is_leaf_key(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether the dotted `key` ('optimizer.learning_rate') names a leaf (not a section) of `config`,
    or ('model.dense_dropouts[1]') an element of a tuple leaf that has that index."""
    base, index = split_index(key)
    node = config
    for part in base.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    if index is None:
        return not isinstance(node, ml_collections.ConfigDict)
    return isinstance(node, (tuple, list)) and index < len(node)


def check_sweep(config: ml_collections.ConfigDict,
                validate: Callable[[ml_collections.ConfigDict], None]) -> None:
    """Checks ``ensemble.sweep``: syntax, sweepable keys that this config reads, every member's values.

    `validate` checks one member's plain config (``imgclf_jax.config.validate``, passed in by it, so
    this module does not import the config module that calls it).

    Raises:
      ConfigError: one line naming ``ensemble.sweep`` and the key or value at fault: not a key of
        the config, a key that cannot be swept (it changes shapes or the program; the message lists
        :data:`SWEEPABLE`), fewer than two combinations, or a member whose config fails validation
        (a value out of range, a key the chosen optimizer, loss or batch transform does not read).
    """
    sweep = parse_sweep(config.ensemble.get("sweep", ""))
    if not sweep:
        return
    for key, _ in sweep:
        if not _sweepable(key):
            known = "a key of this config" if _is_leaf_key(config, key) else "not a key of this config"
            raise ConfigError(f"ensemble.sweep: '{key}' ({known}) cannot be swept: a population shares one "
                              "compiled step, so only keys that change numbers, not shapes or the program, can "
                              f"differ between members; sweepable: {', '.join(SWEEPABLE)}")
        if not _is_leaf_key(config, key):
            base, index = split_index(key)
            if index is not None and _is_leaf_key(config, base):
                raise ConfigError(f"ensemble.sweep: '{key}': {base} has {len(_get(config, base))} "
                                  f"element(s) in this config, indices 0..{len(_get(config, base)) - 1}")
            raise ConfigError(f"ensemble.sweep: '{key}' is not a key of this config")
    if math.prod(len(values) for _, values in sweep) < 2:
        raise ConfigError("ensemble.sweep gives one combination: set the key itself "
                          f"(--config.{sweep[0][0]}={sweep[0][1][0]:g}) or list two values or more")
    for member in members(config)[::config.ensemble.num_members]:  # each combination once
        shown = ", ".join(f"{k}={v:g}" for k, v in member.values.items())
        try:
            validate(member_config(config, member))
        except ConfigError as e:
            raise ConfigError(f"ensemble.sweep member ({shown}): {e}") from None


class _Section(dict):
    """A config section as a dict with attribute access (what the hook builders read), values may be traced."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _sections(tree: dict) -> _Section:
    return _Section({k: _sections(v) if isinstance(v, dict) else v for k, v in tree.items()})


def member_values(config: ml_collections.ConfigDict) -> dict:
    """``{key: float32[K]}``: every swept key's value per member ({} without a sweep); numpy arrays."""
    import numpy as np

    population = members(config)
    return {key: np.asarray([m.values[key] for m in population], np.float32) for key in swept_keys(config)}


@dataclasses.dataclass(frozen=True)
class Hooks:
    """A member's step ingredients built from its values: optimizer, L2 factor, loss, batch transform,
    and its model when a dropout rate is swept (None: the job's model)."""

    tx: Any
    l2: Any
    loss_fn: Callable
    batch_transform: Callable | None
    model: Any = None


def member_hooks(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int
                 ) -> Callable[[dict], Hooks]:
    """``hooks(values) -> Hooks`` for one member, `values` = ``{key: float32[]}`` (traced or concrete).

    The config with the swept keys set to the member's values (arrays) goes through the same
    builders a plain run uses (:func:`imgclf_jax.optim.create_optimizer`,
    :func:`imgclf_jax.steps.recipe_hooks`), which accept array values for these keys; the
    structure they build does not depend on the values (a swept weight decay or label smoothing
    keeps its step even at 0, where it changes nothing), so every member's optimizer state has
    the same tree.
    """
    from imgclf_jax import models, optim, steps

    base = config.to_dict()
    rebuild_model = any(split_index(key)[0] in _MODEL_KEYS for key in swept_keys(config))

    def hooks(values: dict) -> Hooks:
        tree = copy.deepcopy(base)
        for key, value in values.items():
            _set(tree, key, value, cast=False)
        section = _sections(tree)
        tx, _ = optim.create_optimizer(section.optimizer, steps_per_epoch=steps_per_epoch,
                                       num_epochs=config.train.num_epochs)
        loss_fn, batch_transform, _ = steps.recipe_hooks(section, num_classes)
        model = models.create_model(section.model, num_classes) if rebuild_model else None
        return Hooks(tx=tx, l2=section.model.l2, loss_fn=loss_fn, batch_transform=batch_transform, model=model)

    return hooks
