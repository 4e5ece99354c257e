"""Name -> entry tables: how models, optimizers, schedules, losses, augmentation ops and the rest plug in.

Each table lives in the module that implements its entries (``optim.OPTIMIZERS``,
``models.MODELS``, ...), as in optax (a table name -> factory is the whole
plug-in mechanism) and big_vision's ``pp/registry.py`` (ops registered by name
with a decorator). The config names an entry; :meth:`Registry.get` resolves it,
and :mod:`imgclf_jax.config` checks every name against the table that serves it,
so a name is written once: where it is implemented.

Example (a new vote rule, one entry; ``--config.ensemble.vote=geometric`` then works)::

    import numpy as np
    from imgclf_jax.ensemble.voting import VOTES

    @VOTES.register("geometric")
    def geometric_vote(probabilities):  # float32[K, N, C] -> int64[N]
        return np.argmax(np.log(probabilities + 1e-12).sum(0), -1)

Tables whose entries carry more than a function (their config keys, checks)
hold small frozen dataclasses: ``optim.OptimizerEntry``, ``optim.ScheduleEntry``,
``models.ModelEntry``, ``data.augment.AugmentOp``, ``losses.LossEntry``,
``batch_transforms.BatchTransform`` (README, "Extending"). An entry's ``keys``
``{key: default}`` make its config section (the union over the table's entries),
its ``checks`` are run by :func:`check_values`, and :func:`check_unused_keys`
refuses a key the chosen entry does not read unless it is at its default.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

from imgclf_jax.errors import ConfigError


class Registry:
    """A table ``name -> entry`` for the entries chosen by one config key (``table[name]``, ``in``, iteration).

    Args:
      key: the dotted config key whose value names an entry (``'optimizer.name'``), used in errors.
      off: for an optional slot, the value that means "off" (``''``): :meth:`get` returns None for it.

    Entries are added with :meth:`register` (as a decorator or a call); a name is registered once.
    Iteration follows registration order (the order choices are listed in errors and docs).
    """

    def __init__(self, key: str, off: str | None = None):
        self.key = key
        self.off = off  # the value that means "no entry" (a slot that is off), or None: every value names one
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Adds `entry` under `name`; without `entry`, returns a decorator that registers what it decorates.

        Raises:
          ValueError: `name` is already registered (two entries may not share a name).
        """

        def add(value: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"'{name}' is already registered for config key '{self.key}'")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Removes `name` (for tests that register an entry of their own). KeyError if absent."""
        del self._entries[name]

    def get(self, name: str) -> Any:
        """The entry named `name` (None for the table's `off` value).

        Raises:
          ConfigError: no such entry: one line naming the config key and the valid names.
        """
        if self.off is not None and name == self.off:
            return None
        if name not in self._entries:
            off = f"{self.off!r} (off) or " if self.off is not None else ""
            raise ConfigError(f"config key '{self.key}' must be {off}one of {self.names()}, got {name!r}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self._entries)})"


def is_default(value: Any, default: Any) -> bool:
    """Whether a config value equals its default (tuples and lists compared element by element)."""
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) and tuple(value) == tuple(default)
    return value == default


# The value checks of an entry's config keys: key -> (ok(value) -> bool, what the value must be).
Checks = Mapping[str, tuple[Callable[[Any], bool], str]]


def check_values(section: Any, section_name: str, checks: Checks) -> None:
    """Checks the values of `section`'s keys named in `checks` (an entry's ``checks``).

    Raises:
      ConfigError: "config key 'SECTION.KEY' must be WHAT, got VALUE" for the first failing key.
    """
    for key, (ok, what) in checks.items():
        value = section[key]
        if not ok(value):
            raise ConfigError(f"config key '{section_name}.{key}' must be {what}, got {value!r}")


def check_unused_keys(section: Any, section_name: str, defaults: Mapping[str, Any], used: set[str],
                      chosen: str) -> None:
    """Refuses a key of `section` that the chosen entry does not read, unless it is at its default.

    Args:
      section: the config section (a ConfigDict or dict).
      section_name: its dotted name, e.g. 'optimizer'.
      defaults: ``{key: default}`` of the keys that some entry reads (the schema's defaults).
      used: the keys the chosen entry reads.
      chosen: what was chosen, for the message, e.g. "optimizer.name='adam'".

    Raises:
      ConfigError: naming the key, its value and the choice that ignores it.
    """
    for key, default in defaults.items():
        if key in used:
            continue
        value = section[key]
        if not is_default(value, default):
            raise ConfigError(f"config key '{section_name}.{key}' ({value!r}) is not used by {chosen}: "
                              f"leave it at {default!r}, or choose an entry that uses it")


def describe(table: Registry) -> str:
    """'a, b, c': the table's names, for docs and help texts."""
    return ", ".join(table.names())


def is_zero(value: Any) -> bool:
    """Whether `value` is the Python number 0 (a step it switches on can be left out); False for any
    array, traced or not (a population member's value: the step stays, so every member has the same
    program and optimizer-state tree)."""
    return isinstance(value, (int, float)) and value == 0
