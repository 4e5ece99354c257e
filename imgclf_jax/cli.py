"""The command-line contract shared by the tools.

Two families:

- config tools (train, preview, summary):
  ``python -m imgclf_jax.TOOL --config configs/NAME.py [--config.KEY=VALUE ...] [--workdir DIR]``

  - ``--config`` names an ml_collections config file (required; a wrong path lists the configs);
  - ``--config.a.b=value`` (or ``--config.a.b value``) overrides one key, parsed to
    that key's type; unknown keys and wrong types stop with one line;
  - ``--workdir`` defaults to ``runs/NAME`` (summary, which writes nothing, has none);
  - a tool may declare extra flags (``--out FILE``, ``--overwrite``).

- run tools (predict, results, vote) read what finished runs wrote: workdirs and
  files, no config (a run's config is its workdir's config.json). They parse
  their ``--name value`` flags with :func:`parse_flags`.

Every flag a tool accepts is used; any other stops with one line listing the flags.

User errors (:class:`imgclf_jax.errors.UserError`) are printed as one line,
``prog: error: message``, with a non-zero exit status and no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import ml_collections

from imgclf_jax import config as config_lib
from imgclf_jax.errors import ConfigError, Interrupted, PeerStopped, ProcessLost, UserError


@dataclasses.dataclass
class Args:
    """Parsed command line: the resolved and validated config, the workdir, the tool's extras."""

    config: ml_collections.ConfigDict
    config_path: str
    workdir: str
    extras: dict[str, Any]


def paths_and_flags(argv: list[str], flags: dict[str, type]) -> tuple[list[str], dict[str, Any]]:
    """Splits a tool's words into positional paths and :func:`parse_flags` values (no config overrides).

    A word not starting with ``--`` is a path, unless it is the value of the non-bool flag before it
    (``--out report.html``).

    Raises:
      ConfigError: as :func:`parse_flags` (an unknown flag, a missing value, a wrong type).
    """
    paths, flag_words, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("--"):
            paths.append(word)
        else:
            flag_words.append(word)
            name, eq, _ = word[2:].partition("=")
            if not eq and flags.get(name, bool) is not bool and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                flag_words.append(argv[i + 1])
                i += 1
        i += 1
    values, _ = parse_flags(flag_words, flags, config_overrides=False)
    return paths, values


def parse_flags(argv: list[str], flags: dict[str, type], config_overrides: bool = True
                ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Parses ``--name value`` / ``--name=value`` words into typed values.

    Args:
      argv: command-line words (without the program name).
      flags: name -> type (str, int, float or bool; a bool flag takes no value).
      config_overrides: accept ``--config.KEY=VALUE`` words, returned in order.

    Returns:
      (values: every flag, None (False for bools) when absent; overrides: (KEY, VALUE) pairs).

    Raises:
      ConfigError: a positional argument, an unknown flag, a missing value or a wrong type.
    """
    values: dict[str, Any] = {name: (False if kind is bool else None) for name, kind in flags.items()}
    overrides: list[tuple[str, str]] = []
    listing = "--" + ", --".join(flags) + (", --config.KEY=VALUE" if config_overrides else "")
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            raise ConfigError(f"unexpected argument {word!r}; flags: {listing}")
        name, eq, value = word[2:].partition("=")
        if flags.get(name) is bool:
            if eq and value.lower() not in ("true", "1", "yes", "false", "0", "no"):
                raise ConfigError(f"flag --{name} is true or false, got {value!r}")
            values[name] = (value.lower() in ("true", "1", "yes")) if eq else True
            continue
        if name not in flags and not (config_overrides and name.startswith("config.")):
            raise ConfigError(f"unknown flag --{name}; flags: {listing}")
        if not eq:
            if i >= len(words) or words[i].startswith("--"):
                raise ConfigError(f"flag --{name} needs a value")
            value = words[i]
            i += 1
        if name in flags:
            try:
                values[name] = flags[name](value)
            except ValueError:
                raise ConfigError(f"flag --{name} expects {flags[name].__name__}, got {value!r}") from None
        else:
            overrides.append((name[len("config."):], value))
    return values, overrides


def parse_args(argv: list[str], flags: dict[str, type] | None = None, workdir: bool = True) -> Args:
    """Parses a config tool's command line: --config, --config.KEY=VALUE overrides, --workdir, `flags`.

    Args:
      argv: command-line words (without the program name).
      flags: the tool's extra flags, name -> type (see :func:`parse_flags`).
      workdir: whether the tool takes ``--workdir`` (a tool that writes nothing there,
        such as summary, refuses it as an unknown flag rather than ignoring it).

    Raises:
      ConfigError: no --config, an unknown flag or key, a value of the wrong type, or an
        impossible value (see :func:`imgclf_jax.config.validate`).
    """
    known = {"config": str, **({"workdir": str} if workdir else {}), **(flags or {})}
    values, overrides = parse_flags(argv, known)
    config_path, workdir = values.pop("config"), values.pop("workdir", None)
    if config_path is None:
        raise ConfigError("--config configs/NAME.py is required")
    config = config_lib.load_config_file(config_path)
    config_lib.apply_overrides(config, overrides)  # model.name first: it rebuilds the model section
    config_lib.validate(config)
    from imgclf_jax import backend  # before jax starts its backends: XLA flags apply then

    backend.configure_xla(config.model.fast_path)
    if workdir is None:  # also for tools without --workdir: Args.workdir is then the default, unused
        workdir = os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
    return Args(config=config, config_path=config_path, workdir=workdir, extras=values)


def _run_process() -> tuple[int, int] | None:
    """(process index, process count) when JAX's distributed runtime was started in this process, else
    None (asked without starting a jax backend)."""
    if "jax" not in sys.modules:
        return None
    try:
        from jax._src import distributed as jax_distributed

        state = jax_distributed.global_state
        return (state.process_id, state.num_processes) if state.client is not None else None
    except (ImportError, AttributeError):
        return None


def run(main: Callable[[list[str]], int | None], prog: str) -> None:
    """Runs ``main(sys.argv[1:])``; a UserError becomes one line on stderr and its exit code.

    ``--help`` (or ``-h``) prints the tool's module docstring.
    """
    if any(word in ("--help", "-h") for word in sys.argv[1:]):
        print((sys.modules[main.__module__].__doc__ or prog).strip())
        sys.exit(0)
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        run_process = _run_process()
        where = f"process {run_process[0]}: " if run_process and run_process[0] > 0 else ""  # process 0 speaks plainly
        # In a multi-process run, process 0 speaks for the others when they stop alike (an interrupt, a lost
        # process it names too) and for a step they stopped at together; a process's own error is printed.
        quiet = where and (isinstance(e, Interrupted) or getattr(e, "quiet", False))
        if not quiet and not (where and isinstance(e, PeerStopped)):
            print(f"{prog}: error: {'' if str(e).startswith(where) else where}{e}", file=sys.stderr)
        if run_process:  # not sys.exit: JAX's shutdown would wait for processes that may be gone, then abort
            from imgclf_jax import distributed

            distributed.leave(e.exit_code, wait_for_others=not isinstance(e, ProcessLost))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
