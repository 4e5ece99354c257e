"""Start N local training processes as one run: ``python -m imgclf_jax.launch --num_processes N -- <train args>``.

For example::

    python -m imgclf_jax.launch --num_processes 2 -- --config configs/digits.py --workdir runs/digits_2p

starts ``python -m imgclf_jax.train <train args>`` N times on this machine, process i with
``--config.distributed.coordinator_address=127.0.0.1:PORT --config.distributed.num_processes=N
--config.distributed.process_id=i`` (:mod:`imgclf_jax.distributed`). Process 0 prints the run's lines
and writes its files; the others print only errors. Rerunning the same launch resumes the run, with
any number of processes.

Flags (before ``--``):
  --num_processes N        processes to start (>= 1)
  --port P                 the coordinator's port on 127.0.0.1 (default: a free one)
  --devices_per_process D  CPU devices per process (sets JAX_NUM_CPU_DEVICES; default: JAX's, 1)
  --grace_s S              after a process fails, seconds the others get to stop by themselves
                           (they notice within distributed.heartbeat_timeout_s) before SIGKILL (default 90)

SIGINT and SIGTERM are forwarded to every process (each saves a checkpoint after the same step and
exits 130). If a process dies, the launcher says which, waits up to --grace_s for the others, kills
those still running, and exits with the worst status of them all (a signal death counts as 128 + signal).

On a cluster, start the processes with the cluster's own launcher instead, e.g. SLURM's
``srun --ntasks=4 python -m imgclf_jax.train --config ...`` (JAX detects the rest: README, "Several
processes"). One machine with several GPUs needs no launcher: one process uses every local GPU.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError

FLAGS = {"num_processes": int, "port": int, "devices_per_process": int, "grace_s": float}
_FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\d+")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_commands(num_processes: int, port: int, train_args: list[str]) -> list[list[str]]:
    """The command line of each process: ``python -m imgclf_jax.train <train_args>`` plus its distributed keys."""
    return [[sys.executable, "-m", "imgclf_jax.train", *train_args,
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             f"--config.distributed.num_processes={num_processes}",
             f"--config.distributed.process_id={i}"] for i in range(num_processes)]


def child_environment(devices_per_process: int | None) -> dict[str, str]:
    """The processes' environment: this one, with JAX_NUM_CPU_DEVICES set if asked and XLA's forced host
    device count removed from XLA_FLAGS (it does not mix with CPU collectives; the JAX docs)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if _FORCED_DEVICES.search(flags):
        env["XLA_FLAGS"] = _FORCED_DEVICES.sub("", flags).strip()
        if devices_per_process is None:
            print("launch: dropped --xla_force_host_platform_device_count from XLA_FLAGS (it does not mix with "
                  "CPU collectives); use --devices_per_process", file=sys.stderr)
    if devices_per_process is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    return env


def exit_status(returncode: int) -> int:
    """A child's status as a shell shows it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    """'status 1', or 'killed by SIGKILL' for a death by signal."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"status {returncode}"


def supervise(procs: list[subprocess.Popen], grace_s: float, poll_s: float = 0.2, quiet_s: float = 2.0) -> int:
    """Waits for every process; forwards SIGINT/SIGTERM; on a failure gives the others `grace_s`
    seconds, then SIGKILLs them. Returns the worst exit status.

    A process killed by a signal is named; one that exited with an error status printed its own line,
    so the launcher speaks of it only when others are still running `quiet_s` seconds later.
    """
    received = []
    reported = set()

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at, first_failed = None, None
        while [p.poll() for p in procs].count(None):  # poll each: a returncode is only set by poll()
            now = time.monotonic()
            if failed_at is None and not received:
                first_failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
                if first_failed is not None:
                    failed_at = now
            elif failed_at is not None and first_failed not in reported and now - failed_at > quiet_s:
                running = [j for j, q in enumerate(procs) if q.returncode is None]
                print(f"launch: process {first_failed} exited ({describe(procs[first_failed].returncode)}); waiting "
                      f"up to {grace_s:g} s for process(es) {running} to stop", file=sys.stderr, flush=True)
                reported.add(first_failed)
            elif failed_at is not None and now - failed_at > grace_s:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"launch: process {i} still running {grace_s:g} s after the failure; killing it",
                              file=sys.stderr, flush=True)
                        p.kill()
                failed_at = float("inf")
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not received:
        for i, p in enumerate(procs):
            if p.returncode < 0 and i not in reported:  # a signal death leaves no line of its own
                print(f"launch: process {i} exited ({describe(p.returncode)})", file=sys.stderr, flush=True)
    return max(exit_status(p.returncode) for p in procs)


def main(argv: list[str]) -> int:
    """Runs the launcher on command-line words `argv` (see the module docstring); returns the exit status."""
    if "--" not in argv:
        raise ConfigError("usage: python -m imgclf_jax.launch --num_processes N -- --config configs/NAME.py ...")
    split = argv.index("--")
    values, _ = cli.parse_flags(argv[:split], FLAGS, config_overrides=False)
    n = values.get("num_processes")
    if n is None or n < 1:
        raise ConfigError("--num_processes N (>= 1) is required")
    train_args = argv[split + 1:]
    own = ("coordinator_address", "num_processes", "process_id")
    if any(a.startswith(f"--config.distributed.{key}") for a in train_args for key in own):
        raise ConfigError("the launcher sets distributed.coordinator_address, num_processes and process_id "
                          "itself; leave them out of the train arguments")
    cli.parse_args(train_args, {"overwrite": bool})  # a bad train command is one line here, not one per process
    devices = values.get("devices_per_process")
    if devices is not None and devices < 1:
        raise ConfigError("--devices_per_process must be >= 1")
    grace = values.get("grace_s")
    grace = 90.0 if grace is None else grace
    port = values.get("port") or free_port()
    env = child_environment(devices)
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True)  # own groups: a Ctrl-C is forwarded once
             for cmd in child_commands(n, port, train_args)]
    return supervise(procs, grace)


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.launch")
