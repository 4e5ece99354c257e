"""A hyperparameter population in one job against the same members as separate runs.

Usage (from the repository root)::

  python -m benchmarks.population --out DIR [--config configs/resnet_fast.py]
      [--key optimizer.learning_rate] [--values 0.05,0.1,0.2,0.4] [-- --config.KEY=VALUE ...]

Runs ``python -m imgclf_jax.train`` once with ``--config.ensemble.sweep='KEY=VALUES'``
(one member per value, seed from the config) in ``DIR/population``, then once per value
with ``--config.KEY=value`` in ``DIR/single_<value>``, one after another in this command,
each a fresh process (what a user would run), with the same extra overrides (e.g. a
subset: ``--config.data.max_train_examples=2000``). Prints one JSON line::

  {"benchmark": "population", "key": KEY, "values": [...],
   "population_seconds": wall time of the population's process,
   "separate_seconds": sum of the separate runs' process wall times,
   "speedup": separate / population,
   "members": [{"value": v, "population_best_val_accuracy": ..., "single_best_val_accuracy": ...,
                "best_epoch": ..., "single_best_epoch": ...}, ...], "machine": {...}}

Wall times include each process's start (imports, data loading, compilation): a
population pays those once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _train(args: list[str], workdir: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "imgclf_jax.train", *args, "--workdir", workdir, "--overwrite"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.population: the run in {workdir} failed: {done.stderr.strip()[-2000:]}")
    return seconds


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    flags = {"--out": None, "--config": "configs/resnet_fast.py", "--key": "optimizer.learning_rate",
             "--values": "0.05,0.1,0.2,0.4"}
    for word in argv:
        name, _, value = word.partition("=")
        if name not in flags or not value:
            raise SystemExit(f"usage: python -m benchmarks.population --out=DIR [--config=C] [--key=K] "
                             f"[--values=V1,V2] [-- overrides]; got {word!r}")
        flags[name] = value
    if not flags["--out"]:
        raise SystemExit("benchmarks.population: --out=DIR is required")
    out, key = flags["--out"], flags["--key"]
    values = [float(v) for v in flags["--values"].split(",")]
    base = ["--config", flags["--config"], *extra]
    population_seconds = _train([*base, f"--config.ensemble.sweep={key}={flags['--values']}"],
                                os.path.join(out, "population"))
    with open(os.path.join(out, "population", "summary.json")) as f:
        population = json.load(f)
    separate, members = 0.0, []
    for i, value in enumerate(values):
        workdir = os.path.join(out, f"single_{value:g}")
        separate += _train([*base, f"--config.{key}={value!r}"], workdir)
        with open(os.path.join(workdir, "summary.json")) as f:
            single = json.load(f)
        member = population["members"][i]
        members.append({"value": value, "population_best_val_accuracy": member["best_val_accuracy"],
                        "best_epoch": member["best_epoch"], "single_best_val_accuracy": single["best_val_accuracy"],
                        "single_best_epoch": single["best_epoch"]})
    from benchmarks import machine

    print(json.dumps({"benchmark": "population", "config": flags["--config"], "overrides": extra, "key": key,
                      "values": values, "population_seconds": round(population_seconds, 1),
                      "separate_seconds": round(separate, 1), "speedup": round(separate / population_seconds, 3),
                      "mapping": population["mapping"], "members": members, "machine": machine.describe()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
