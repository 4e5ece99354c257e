"""Training throughput with 1 and 2 local processes (multi-process data parallelism), side by side.

Usage (from the repository root)::

  python -m benchmarks.processes [--layouts 1x1,1x2,2x1] [--epochs 3] [-- <train args>]

Each layout ``PxD`` trains the same run as P processes of D CPU devices each: ``1xD`` with
``python -m imgclf_jax.train`` (``JAX_NUM_CPU_DEVICES=D``), ``Px1`` with P > 1 through
``python -m imgclf_jax.launch`` (gloo collectives on localhost). The train arguments after ``--``
(default: ``--config configs/digits.py``, the whole 1,437-image training split) get
``--config.train.num_epochs=EPOCHS`` and a fresh temporary workdir. The layouts run one after
another in this command, so they share the machine's state.

Prints JSON lines: one ``"benchmark": "processes"`` row per layout (``train_images_per_s``: the
median over epochs 2.. of the run's own per-epoch training rate, ``history.json``; epoch 1 holds
compilation; ``wall_seconds`` of the whole command, start-up, data and compilation included;
``same_history_as``: the first earlier layout whose per-epoch losses and accuracies it equals exactly,
or null), then a ``"part": "summary"`` row with each layout's rate over the first layout's.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = {"layouts": str, "epochs": int}
DEFAULT_TRAIN_ARGS = ["--config", "configs/digits.py"]
_FORCED = re.compile(r"--xla_force_host_platform_device_count=\d+")
_COMPARED = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def parse_layout(text: str) -> tuple[int, int]:
    """'2x1' -> (2 processes, 1 device each).

    Raises:
      ConfigError: not PxD with P, D >= 1.
    """
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ConfigError(f"--layouts: {text!r} is not PxD (processes x devices per process), e.g. 2x1")
    return int(match[1]), int(match[2])


def layout_command(processes: int, devices: int, train_args: list[str], workdir: str) -> tuple[list[str], dict]:
    """The command and environment that train `train_args` as `processes` x `devices`."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = _FORCED.sub("", env.get("XLA_FLAGS", "")).strip()  # CPU collectives refuse it
    args = [*train_args, "--workdir", workdir]
    if processes == 1:
        return [sys.executable, "-m", "imgclf_jax.train", *args], env
    return ([sys.executable, "-m", "imgclf_jax.launch", "--num_processes", str(processes),
             "--devices_per_process", str(devices), "--", *args], env)


def measure_layout(processes: int, devices: int, train_args: list[str]) -> tuple[dict, list[dict]]:
    """Trains once in layout `processes` x `devices`; returns (its row, its history)."""
    with tempfile.TemporaryDirectory(prefix="imgclf_jax_processes_") as tmp:
        cmd, env = layout_command(processes, devices, train_args, os.path.join(tmp, "run"))
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            tail = [line for line in lines if "error:" in line][:1] or lines[-1:] or ["(no output)"]
            raise ConfigError(f"layout {processes}x{devices} failed (status {done.returncode}): {tail[0]}")
        history = json.loads(pathlib.Path(tmp, "run", "history.json").read_text())
    rates = [e["train_images_per_s"] for e in history[1:] if e.get("train_images_per_s")]
    row = {"benchmark": "processes", "processes": processes, "devices_per_process": devices,
           "devices": processes * devices, "epochs": len(history),
           "train_images_per_s": statistics.median(rates) if rates else None,
           "train_images_per_s_min": min(rates) if rates else None,
           "train_images_per_s_max": max(rates) if rates else None,
           "wall_seconds": wall, "final_val_accuracy": history[-1]["val_accuracy"]}
    return row, history


def summary_row(rows: list[dict]) -> dict:
    """Each layout's training rate over the first layout's (the baseline)."""
    base = rows[0]["train_images_per_s"]
    return {"benchmark": "processes", "part": "summary",
            "baseline": f"{rows[0]['processes']}x{rows[0]['devices_per_process']}",
            "ratio_to_baseline": {f"{r['processes']}x{r['devices_per_process']}":
                                  (r["train_images_per_s"] / base if base and r["train_images_per_s"] else None)
                                  for r in rows}}


def main(argv: list[str]) -> int:
    """Runs the benchmark on command-line words `argv` (see the module docstring)."""
    split = argv.index("--") if "--" in argv else len(argv)
    values, _ = cli.parse_flags(argv[:split], FLAGS, config_overrides=False)
    layouts = [parse_layout(t) for t in (values.get("layouts") or "1x1,1x2,2x1").split(",")]
    epochs = values.get("epochs") or 3
    if epochs < 2:
        raise ConfigError("--epochs must be >= 2 (epoch 1 holds compilation and is not counted)")
    train_args = [*(argv[split + 1:] or DEFAULT_TRAIN_ARGS), f"--config.train.num_epochs={epochs}"]
    rows, histories = [], {}
    for processes, devices in layouts:
        print(f"processes: {processes} x {devices} device(s) ...", file=sys.stderr, flush=True)
        row, history = measure_layout(processes, devices, train_args)
        compared = [{k: e[k] for k in _COMPARED} for e in history]
        row["same_history_as"] = next((name for name, h in histories.items() if h == compared), None)
        histories[f"{processes}x{devices}"] = compared
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(summary_row(rows)), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.processes")
