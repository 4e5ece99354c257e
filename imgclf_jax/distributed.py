"""Several training processes as one run, on JAX's distributed runtime (``jax.distributed``).

A run is multi-process when the config's ``distributed`` section or the environment says so
(:func:`wanted`): ``distributed.num_processes > 1`` with ``coordinator_address`` and
``process_id`` (what :mod:`imgclf_jax.launch` passes to each local process), or a cluster JAX
detects by itself (``srun`` with more than one task, Open MPI's ``mpirun``, a TPU slice, or the
``JAX_COORDINATOR_ADDRESS`` environment variable): then :func:`initialize` calls
``jax.distributed.initialize`` with the keys that are set and leaves the rest to JAX's cluster
detection. A single process needs none of it and never starts the runtime.

What the other modules do with it:

- one global mesh over every process's devices (:func:`imgclf_jax.parallel.make_mesh`); params and
  optimizer state are global arrays, replicated; each process loads only its share of each global
  batch (:mod:`imgclf_jax.data.pipeline`, ``shard``) and the batch becomes one global array
  (:func:`imgclf_jax.parallel.shard_batch`, ``jax.make_array_from_process_local_data``);
- evaluation splits each batch the same way and gathers the probabilities on every process, so every
  process computes the same metrics and makes the same early-stopping decision;
- only process 0 (:func:`is_primary`) writes files (history, summary, plots, submissions, config.json,
  TensorBoard, the workdir lock); checkpoints go through orbax's multi-process path, which every
  process calls; the workdir must be on a filesystem every process sees;
- an interrupt on any process stops every process at the same step (:func:`any_process`).

On the CPU, collectives run over gloo (``jax_cpu_collectives_implementation``); set the CPU device
count per process with ``JAX_NUM_CPU_DEVICES`` (the JAX docs: CPU collectives and
``--xla_force_host_platform_device_count`` do not mix).

If a process dies, the others' next collective fails, or, when they wait elsewhere, JAX's
coordination service notices the missing heartbeats after ``distributed.heartbeat_timeout_s``
seconds; either way the others stop with one line (:class:`imgclf_jax.errors.ProcessLost`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import zlib

from imgclf_jax.errors import ConfigError, PeerStopped, ProcessLost, UserError

# Environment variables by which a cluster launcher announces more than one task to JAX's own detection.
_CLUSTER_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def wanted(dist) -> bool:
    """Whether the ``distributed`` config section (or the environment) asks for a multi-process run.

    True when ``num_processes > 1`` or ``coordinator_address`` is set, when ``JAX_COORDINATOR_ADDRESS``
    is set, inside ``srun`` / ``mpirun`` with more than one task (SLURM_NTASKS, OMPI_COMM_WORLD_SIZE;
    under SLURM only within a job step, ``SLURM_STEP_ID``), or on a multi-host Cloud TPU slice
    (TPU_WORKER_HOSTNAMES lists several hosts). ``num_processes == 1`` forces a single process. Other
    clusters (Kubernetes, mpi4py) set the keys or ``JAX_COORDINATOR_ADDRESS`` themselves.
    """
    if dist.num_processes == 1:
        return False
    if dist.num_processes > 1 or dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for name in _CLUSTER_COUNTS:
        try:
            count = int(os.environ.get(name, "1"))
        except ValueError:
            count = 1
        if count > 1 and (name != "SLURM_NTASKS" or "SLURM_STEP_ID" in os.environ):
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host Cloud TPU slice


def check_section(dist) -> None:
    """Checks the ``distributed`` section's values; raises ConfigError naming the key."""
    if dist.num_processes < 0:
        raise ConfigError(f"config key 'distributed.num_processes' must be >= 0 (0 = from the environment), "
                          f"got {dist.num_processes!r}")
    if dist.process_id < -1 or (dist.num_processes > 0 and dist.process_id >= dist.num_processes):
        raise ConfigError(f"config key 'distributed.process_id' must be -1 (from the environment) or in "
                          f"0..num_processes-1, got {dist.process_id!r}")
    if dist.num_processes > 1 and not (dist.coordinator_address and dist.process_id >= 0):
        raise ConfigError("distributed.num_processes > 1 needs distributed.coordinator_address (host:port of "
                          "process 0) and distributed.process_id; or use python -m imgclf_jax.launch, or srun")
    if dist.coordinator_address and ":" not in dist.coordinator_address:
        raise ConfigError(f"config key 'distributed.coordinator_address' must be host:port, got "
                          f"{dist.coordinator_address!r}")
    for key in ("heartbeat_timeout_s", "initialization_timeout_s"):
        if dist[key] < 1:
            raise ConfigError(f"config key 'distributed.{key}' must be >= 1 second, got {dist[key]!r}")


def initialize(config) -> bool:
    """Starts JAX's distributed runtime when :func:`wanted` (before anything touches a jax backend).

    Returns whether it did. On the CPU backend, cross-process collectives use gloo.

    Raises:
      ConfigError: a bad ``distributed`` section, or the coordinator cannot be reached within
        ``distributed.initialization_timeout_s`` (the message names the address).
    """
    dist = config.distributed
    check_section(dist)
    if not wanted(dist):
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {
        "coordinator_address": dist.coordinator_address or None,
        "num_processes": dist.num_processes or None,
        "process_id": None if dist.process_id < 0 else dist.process_id,
        "initialization_timeout": int(dist.initialization_timeout_s),
        "heartbeat_timeout_seconds": int(dist.heartbeat_timeout_s),
    }
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address and dist.process_id > 0:  # jaxlib aborts the process (a fatal log) on an unreachable coordinator
        _wait_for_coordinator(address, dist.initialization_timeout_s)
    accepted = inspect.signature(jax.distributed.initialize).parameters  # older jax: fewer keywords
    try:
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted})
    except (RuntimeError, ValueError) as e:
        where = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "(detected)")
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not join the distributed run at coordinator {where}: {first}") from None
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until `address` (host:port, process 0's coordination service) accepts TCP connections.

    Raises:
      ConfigError: it does not within `timeout_s` seconds (naming the address).
    """
    import socket
    import time

    host, _, port = address.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"config key 'distributed.coordinator_address' must be host:port, got {address!r}") from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port_number), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"could not join the distributed run at coordinator {address}: nothing answered "
                                  f"there within distributed.initialization_timeout_s={timeout_s:g} s ({e}); start "
                                  "process 0 there, or check the address") from None
            time.sleep(0.5)


def process_index() -> int:
    """This process's index in the run (0 when single-process)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """Processes in the run (1 when single-process)."""
    import jax

    return jax.process_count()


def share() -> tuple[int, int]:
    """(process index, process count): which share of each global batch this process loads."""
    return process_index(), process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true for a single process).

    A tool that has not imported jax is a single process (no jax import here: the report tools stay fast).
    """
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def _gather_ints(values: list[int]):
    """int64[P, len(values)]: every process's `values` (the same length on each)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process must call it at the same point)."""
    if process_count() == 1:
        return flag
    return bool(_gather_ints([int(flag)]).any())


def together(step: str, work):
    """Runs ``work()`` on every process as one step: if it raises a UserError on any process, every
    process stops here (that process with its own error, the others with :class:`PeerStopped`), so a
    check that only process 0 makes (the workdir, its lock) cannot leave the others waiting for it; an
    error that every process meets alike is printed by process 0 alone (the others' is a quiet PeerStopped).
    Returns ``work()``'s result. For a single process it is just ``work()``.
    """
    try:
        result, error = work(), None
    except UserError as e:
        result, error = None, e
    if process_count() == 1:
        if error is not None:
            raise error
        return result
    text = zlib.crc32(str(error).encode()) if error is not None else 0
    failed = _gather_ints([int(error is not None), error.exit_code if error is not None else 0, text])
    if error is not None:
        if process_index() > 0 and not isinstance(error, PeerStopped) and failed[0, 0] and failed[0, 2] == text:
            raise PeerStopped(str(error), error.exit_code)  # process 0 prints the same message
        raise error
    if failed[:, 0].any():
        first = int(failed[:, 0].argmax())
        raise PeerStopped(f"process {first} stopped at {step} (its message above says why)", int(failed[first, 1]))
    return result


def leave(exit_code: int, wait_for_others: bool = True) -> None:
    """Ends this process of a multi-process run at once (``os._exit``: JAX's shutdown barrier would wait
    for processes that may be gone, then abort), process 0 last.

    Process 0 hosts the coordination service: if it exits first, the others' runtime aborts them with a
    multi-line fatal log. So every other process says it is leaving (the service's key-value store)
    and exits, and process 0 waits up to 5 s for them (`wait_for_others`; not when one is known gone).
    """
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        from jax._src import distributed as jax_distributed

        state = jax_distributed.global_state
        prefix = "imgclf_jax/leaving/"
        if state.process_id != 0:
            state.client.key_value_set(f"{prefix}{state.process_id}", "1", allow_overwrite=True)
        elif wait_for_others:
            deadline = time.monotonic() + 5.0
            while (len(state.client.key_value_dir_get(prefix)) < state.num_processes - 1
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            time.sleep(0.3)  # they have said so; now let them be gone
    except Exception:
        pass
    os._exit(exit_code)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called `name` (no-op for a single process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def _quiet_stdout_fd():
    """Within the block, file descriptor 1 (C++ code's stdout, not only Python's) goes to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _comparable(config, workdir: str) -> dict[str, str]:
    """key -> JSON of its value: every leaf key but the ``distributed`` section (it differs per
    process), and ``--workdir`` (as an absolute path)."""
    def flatten(d: dict, prefix: str = "") -> dict:  # (not workdir.flat_config: workdir imports config, which imports this)
        out = {}
        for key, value in d.items():
            out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    flat = flatten(json.loads(json.dumps(config.to_dict())))
    flat["--workdir"] = os.path.abspath(workdir)
    return {k: json.dumps(v, sort_keys=True) for k, v in sorted(flat.items()) if not k.startswith("distributed.")}


def check_same_config(config, workdir: str) -> None:
    """Refuses to start when the processes were given different configs or workdirs (no-op for a
    single process). Every process must call it, right after :func:`initialize`.

    Raises:
      ConfigError: naming the first key whose value differs and the processes whose value is not
        process 0's.
    """
    if process_count() == 1:
        return
    flat = _comparable(config, workdir)
    with _quiet_stdout_fd():  # the run's first collective: gloo prints "[Gloo] Rank i is connected to ..." here
        counts = _gather_ints([len(flat)])
    if (counts != counts[0]).any():
        raise ConfigError(f"the processes were given different configs (key counts per process: "
                          f"{counts[:, 0].tolist()}); start every process with the same command")
    hashes = _gather_ints([zlib.crc32(f"{k}={v}".encode()) for k, v in flat.items()])
    differ = (hashes != hashes[0]).any(axis=0)
    if differ.any():
        key = list(flat)[int(differ.argmax())]
        others = [p for p in range(len(hashes)) if hashes[p, differ.argmax()] != hashes[0, differ.argmax()]]
        raise ConfigError(f"the processes were given different configs: '{key}' differs on process(es) "
                          f"{others} from process 0's (here {flat[key]}); start every process with the same command")


def _missing_processes(wait_s: float) -> list[int] | None:
    """The processes JAX's coordination service no longer sees, waiting up to `wait_s` seconds for it
    to notice (its heartbeat timeout); None when it cannot be asked (an older jax, or the coordinator,
    process 0, is the one gone)."""
    import time

    try:
        from jax._src import distributed as jax_distributed  # get_live_nodes has no public wrapper yet

        client = jax_distributed.global_state.client
        everyone = list(range(process_count()))
        deadline = time.monotonic() + wait_s
        while True:
            live = set(client.get_live_nodes(everyone))
            missing = [p for p in everyone if p not in live]
            if missing or time.monotonic() >= deadline:
                return missing or None
            time.sleep(0.5)
    except Exception:
        return None


def _unanswered_roll_call(index: int, count: int, wait_s: float) -> list[int] | None:
    """The processes that do not answer a roll call within `wait_s` seconds, or None when the roll call
    cannot be held (process 0's key-value store, the coordinator, is gone too, or an older jax).

    Every survivor of a lost process fails at its next collective, within milliseconds of the others
    (their connections drop in a cascade), and calls this: each writes its index under one key
    prefix of the coordination service's key-value store and, after `wait_s`, the indices missing
    there are the lost processes. This names them before the service's own heartbeat timeout, at
    which jaxlib stops every process with a multi-line fatal log.
    """
    import time

    try:
        from jax._src import distributed as jax_distributed  # the key-value store has no public wrapper

        client = jax_distributed.global_state.client
        prefix = "imgclf_jax/roll_call/"
        client.key_value_set(f"{prefix}{index}", "here", allow_overwrite=True)
        time.sleep(wait_s)
        answered = {int(key.rstrip("/").rsplit("/", 1)[-1]) for key, _ in client.key_value_dir_get(prefix)}
    except Exception:
        return None
    return [p for p in range(count) if p not in answered] or None


def lost_process_error(exc: BaseException, heartbeat_timeout_s: float) -> ProcessLost | None:
    """The one-line error for a collective or runtime failure caused by a missing process, or None.

    Such failures come from XLA as ``XlaRuntimeError`` / ``ValueError`` mentioning gloo, a closed
    connection or the coordination service's heartbeats. With 2 processes the missing one is the
    other, named at once; with more, the survivors hold a roll call (:func:`_unanswered_roll_call`,
    a few seconds), and only if that fails ask the coordination service, which notices within
    `heartbeat_timeout_s` seconds (at that moment the runtime itself may stop the process first, with
    its own multi-line log naming the unhealthy task: jaxlib's fatal-error callback cannot be
    replaced from Python, a Python callback aborts with std::bad_cast).
    """
    text = str(exc)
    signs = ("Gloo", "gloo", "Connection closed by peer", "heartbeat", "coordination service", "unhealthy",
             "Connection reset", "Broken pipe")
    if process_count() == 1 or not any(s in text for s in signs):
        return None
    index, count = process_index(), process_count()
    if count == 2:
        missing = [1 - index]
    else:
        missing = _unanswered_roll_call(index, count, min(3.0, heartbeat_timeout_s / 2))
        if missing is None:
            missing = _missing_processes(heartbeat_timeout_s + 5.0)
    who = (f"process {', '.join(map(str, missing))} of {count} is gone" if missing
           else "another process of the run stopped or cannot be reached (if it is process 0, the coordinator)")
    first = text.strip().splitlines()[0][:200]
    lost = ProcessLost(f"process {index}: {who} ({first}); stopped; rerun the same launch to resume "
                       "from the last checkpoint")
    lost.quiet = index != 0 and bool(missing) and 0 not in missing  # process 0 says it for every survivor
    return lost
