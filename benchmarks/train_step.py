"""Train-step speed of the reference models: imgclf_jax beside the Keras stack it replaces.

Usage (from the repository root)::

  python -m benchmarks.train_step [--models ml1,ml6] [--frameworks imgclf_jax,imgclf_jax-xla,imgclf_jax-bf16,keras-tensorflow,keras-jax]
      [--steps N] [--repeats 3] [--warmup 2] [--batch 32] [--image_size 128] [--repeat_seconds 5]
      [--matmul_size N] [--no_probe]

Prints JSON lines on stdout: a ``"benchmark": "machine"`` line (the hardware
and the matmul probe of :mod:`benchmarks.machine`, run before the rows), then
one ``"benchmark": "train_step"`` line per (model, framework), in the order
given, each as soon as it is measured, and a second machine line after the
rows (``"when": "after"``; a large change means the machine was busy). Each
row::

  {"benchmark": "train_step", "model": "ml1", "framework": "imgclf_jax",
   "images_per_s": median over repeats, "params": N, "gflops_per_s": G,
   "fraction_of_machine": G / matmul GFLOP/s, "host_peak_rss_bytes": B,
   "device_peak_bytes": B or null, "flops_convention": "...", ...}

Frameworks: ``imgclf_jax`` (:mod:`benchmarks.step_imgclf`; its CPU fast path,
:mod:`imgclf_jax.models.fast_path`, as training decides it), ``imgclf_jax-xla``
(the same with ``IMGCLF_JAX_FAST_PATH=0``: XLA's own gradients), ``imgclf_jax-bf16``
(``model.compute_dtype='bfloat16'``, float32 params and optimizer state), ``keras-tensorflow``
and ``keras-jax`` (:mod:`benchmarks.step_keras`: the same architecture built in
Keras 3 by :mod:`benchmarks.keras_models`, on TensorFlow or on JAX). Every row
runs in a fresh subprocess (Keras's backend is fixed at import; the peak RSS is
that row's alone). A framework whose packages are missing gives a row with
``"skipped": reason`` instead of numbers (``pip install '.[bench]'``).

Models are config names under ``configs/`` (or paths to config files); 5
classes, as the reference competition. The batch is fixed synthetic data, so
the input pipeline is not part of the figure. ``--steps`` is the number of
steps per timed repeat; by default it is chosen from the warm-up so that a
repeat lasts about ``--repeat_seconds`` (at least 2 steps). GFLOP/s follow
:data:`benchmarks.flops.TRAIN_FLOPS_CONVENTION` (3 x the forward FLOPs of
``imgclf_jax.summary``).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from imgclf_jax import cli
from imgclf_jax import config as config_lib
from imgclf_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FRAMEWORKS = ("imgclf_jax", "imgclf_jax-xla", "imgclf_jax-bf16", "keras-tensorflow", "keras-jax")
# imgclf_jax-xla: imgclf_jax with its CPU fast path off (IMGCLF_JAX_FAST_PATH=0): XLA's own gradients.
FAST_PATH_OFF = {"imgclf_jax-xla": "0"}
# imgclf_jax-bf16: imgclf_jax with model.compute_dtype='bfloat16' (float32 params; README "Precision").
COMPUTE_DTYPE = {"imgclf_jax-bf16": "bfloat16"}
DEFAULT_FRAMEWORKS = ("imgclf_jax", "imgclf_jax-xla", "keras-tensorflow", "keras-jax")  # without --frameworks
KERAS_BACKEND = {"keras-tensorflow": "tensorflow", "keras-jax": "jax"}
NUM_CLASSES = 5  # the reference competition
FLAGS = {
    "models": str, "frameworks": str, "steps": int, "repeats": int, "warmup": int, "batch": int,
    "image_size": int, "repeat_seconds": float, "matmul_size": int, "no_probe": bool,
    "row": str, "row_out": str,  # internal: one row in this process, written to a file
}
ROW_FLAGS = ("steps", "repeats", "warmup", "batch", "image_size", "repeat_seconds")  # passed to a row


def config_path(model: str) -> pathlib.Path:
    """``configs/<model>.py`` of the repository, or `model` itself when it is a path to a file."""
    path = pathlib.Path(model)
    if model.endswith(".py") or path.exists():
        return path
    return ROOT / "configs" / f"{model}.py"


def load_model_config(model: str):
    """The config of a model name ('ml1') or config path.

    Raises:
      ConfigError: no such config.
    """
    path = config_path(model)
    if not path.is_file():
        names = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
        raise ConfigError(f"no config {str(path)!r} for model {model!r}; models: {', '.join(names)}")
    return config_lib.load_config_file(str(path))


def _settings(values: dict) -> dict:
    return {
        "steps": values["steps"], "repeats": values["repeats"] or 3,
        "warmup": 2 if values["warmup"] is None else values["warmup"],
        "batch": values["batch"] or 32, "image_size": values["image_size"],
        "repeat_seconds": values["repeat_seconds"] or 5.0,
    }


def measure_row(model: str, framework: str, settings: dict) -> dict:
    """Measures one (model, framework) row in this process (the subprocess side).

    Returns:
      The row without the derived FLOP fields, or with ``"skipped"`` when the
      framework's packages are missing.
    """
    config = load_model_config(model)
    if framework in COMPUTE_DTYPE:
        config_lib.apply_override(config, "model.compute_dtype", COMPUTE_DTYPE[framework])
    image_size = settings["image_size"] or config.data.image_size
    args = (config, NUM_CLASSES, image_size, settings["batch"], settings["steps"], settings["repeats"],
            settings["warmup"], settings["repeat_seconds"])
    row = {"benchmark": "train_step", "model": model, "framework": framework,
           "batch": settings["batch"], "image_size": image_size}
    if framework.startswith("imgclf_jax"):
        from benchmarks import step_imgclf
        from imgclf_jax import backend

        backend.configure_xla(config.model.fast_path)  # as training sets it (off for imgclf_jax-xla)

        return {**row, **step_imgclf.measure_train_step(*args)}
    from benchmarks import step_keras

    try:
        return {**row, **step_keras.measure_train_step(*args, backend=KERAS_BACKEND[framework])}
    except step_keras.SkipRow as e:
        return {**row, "skipped": str(e), "images_per_s": None}


def derive(row: dict, machine_gflops: float | None) -> dict:
    """Adds the FLOP figures to a measured row: train FLOPs per image, GFLOP/s, fraction of the machine."""
    from benchmarks import flops  # imports jax: not in the Keras-on-TensorFlow subprocess

    config = load_model_config(row["model"])
    forward = flops.forward_flops_per_image(config.model, row["image_size"], NUM_CLASSES)
    train = flops.train_flops_per_image(config.model, row["image_size"], NUM_CLASSES)
    row = {**row, "flops_per_image_forward": forward, "train_flops_per_image": train,
           "flops_convention": flops.TRAIN_FLOPS_CONVENTION}
    if row.get("images_per_s"):
        row["gflops_per_s"] = row["images_per_s"] * train / 1e9
        row["machine_gflops_per_s"] = machine_gflops
        row["fraction_of_machine"] = row["gflops_per_s"] / machine_gflops if machine_gflops else None
    return row


def _run_child(module_args: list[str], env: dict | None = None) -> tuple[int, str, str]:
    """Runs ``python -m ...`` from the repository root; returns (exit status, stdout, stderr tail)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run([sys.executable, "-m", *module_args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=err, text=True, env={**os.environ, **(env or {})})
        err.seek(0)
        tail = err.read()[-3000:]
    return proc.returncode, proc.stdout, tail


def probe(matmul_size: int | None, when: str) -> dict:
    """The machine line from a subprocess of :mod:`benchmarks.machine` (so no device stays held here)."""
    args = ["benchmarks.machine"] + ([f"--matmul_size={matmul_size}"] if matmul_size else [])
    code, out, err = _run_child(args)
    if code != 0:
        return {"benchmark": "machine", "when": when, "error": err.strip().splitlines()[-1:]}
    return {**json.loads(out.strip().splitlines()[-1]), "when": when}


def run_row(model: str, framework: str, values: dict) -> dict:
    """Measures one row in a fresh subprocess; a crash becomes a row with ``"error"``."""
    env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
    if framework in KERAS_BACKEND:
        env["KERAS_BACKEND"] = KERAS_BACKEND[framework]
    if framework in FAST_PATH_OFF:
        env["IMGCLF_JAX_FAST_PATH"] = FAST_PATH_OFF[framework]
    passed = [f"--{k}={v}" for k, v in values.items() if k in ROW_FLAGS and v is not None]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        code, _, err = _run_child(["benchmarks.train_step", f"--row={framework}", f"--models={model}",
                                   f"--row_out={out}", *passed], env)
        if code == 0 and os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    return {"benchmark": "train_step", "model": model, "framework": framework, "images_per_s": None,
            "error": f"exit status {code}: " + " | ".join(err.strip().splitlines()[-5:])}


def _summary(row: dict) -> str:
    if row.get("skipped") or row.get("error"):
        return f"{row.get('skipped') or row.get('error')}"
    fraction = row.get("fraction_of_machine")
    share = f", {100 * fraction:.1f}% of the matmul probe" if fraction else ""
    return (f"{row['images_per_s']:.1f} img/s, {row['gflops_per_s']:.1f} GFLOP/s{share}, "
            f"peak RSS {row['host_peak_rss_bytes'] / 2**30:.2f} GiB")


def main(argv: list[str]) -> int:
    """Runs the benchmark on command-line words `argv` (see the module docstring); returns the exit status."""
    values, _ = cli.parse_flags(argv, FLAGS, config_overrides=False)
    models = [m for m in (values["models"] or "ml1,ml6").split(",") if m]
    frameworks = [f for f in (values["frameworks"] or ",".join(DEFAULT_FRAMEWORKS)).split(",") if f]
    for framework in frameworks:
        if framework not in FRAMEWORKS:
            raise ConfigError(f"unknown framework {framework!r}; frameworks: {', '.join(FRAMEWORKS)}")
    for model in models:
        load_model_config(model)
    if values["row"]:  # the subprocess side
        if len(models) != 1 or not values["row_out"]:
            raise ConfigError("--row needs exactly one model and --row_out")
        row = measure_row(models[0], values["row"], _settings(values))
        with open(values["row_out"], "w") as f:
            json.dump(row, f)
        return 0

    machine_gflops = None
    if not values["no_probe"]:
        machine = probe(values["matmul_size"], "before")
        machine_gflops = machine.get("matmul_gflops_per_s")
        print(json.dumps(machine), flush=True)
    for model in models:
        for framework in frameworks:
            print(f"train_step: {model} on {framework} ...", file=sys.stderr, flush=True)
            row = derive(run_row(model, framework, values), machine_gflops)
            print(f"train_step: {model} on {framework}: {_summary(row)}", file=sys.stderr, flush=True)
            print(json.dumps(row), flush=True)
    if not values["no_probe"]:
        print(json.dumps(probe(values["matmul_size"], "after")), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.train_step")
