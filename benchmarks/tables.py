"""Markdown tables of benchmark results, for the README's Performance section.

Usage::

  python -m benchmarks.tables RESULTS.jsonl [MORE.jsonl ...]

Reads the JSON lines the benchmarks print (any mix of machine, train_step,
input_pipeline and profile_step lines) and prints, for what it finds: the
machine (from the first machine line), a train-step table (model, framework,
images/s, GFLOP/s, share of the matmul probe, parameters, peak host RSS,
peak device memory), an ensemble table (K members per mapping mode against K
separate steps), an input-pipeline table (workers, images/s, ratio to the
train step) and, per profiled model, the shares of its train step.
"""

from __future__ import annotations

import json
import sys

from imgclf_jax import cli
from imgclf_jax.errors import ConfigError


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if value else "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine_text(line: dict) -> str:
    """One sentence on the hardware and the matmul probe."""
    devices = ", ".join(line["devices"])
    return (f"{line['date'][:10]}: {line['cpu']} ({line['cpu_count']} CPUs), {line['backend']} backend "
            f"({devices}), jax {line['versions']['jax']}; float32 matmul {line['matmul_size']}^2: "
            f"{line['matmul_gflops_per_s']:.0f} GFLOP/s.")


def train_step_table(rows: list[dict]) -> str:
    """Model, framework, img/s, GFLOP/s, % of the matmul probe, params, peak RSS and device GiB."""
    body = []
    for r in rows:
        if r.get("images_per_s") is None:
            body.append([r["model"], r["framework"], "skipped" if r.get("skipped") else "error",
                         "-", "-", "-", "-", "-"])
            continue
        fraction = r.get("fraction_of_machine")
        body.append([r["model"], r["framework"], f"{r['images_per_s']:.1f}", f"{r['gflops_per_s']:.1f}",
                     f"{100 * fraction:.1f}%" if fraction else "-", f"{r['params']:,}",
                     _gib(r.get("host_peak_rss_bytes")), _gib(r.get("device_peak_bytes"))])
    return _table(["model", "framework", "images/s", "GFLOP/s", "of matmul", "params", "peak RSS GiB",
                   "peak device GiB"], body)


def input_pipeline_table(rows: list[dict], summary: dict | None) -> str:
    """Workers, img/s, startup seconds, and the ratio to the train step when measured."""
    ratios = (summary or {}).get("pipeline_over_train_step") or {}
    body = [[str(r["workers"]), f"{r['images_per_s']:.0f}", f"{r['startup_seconds']:.2f}",
             f"{ratios[str(r['workers'])]:.1f}x" if str(r["workers"]) in ratios else "-"] for r in rows]
    return _table(["workers", "images/s", "first batch s", "of train step"], body)


def profile_table(summary: dict) -> str:
    """The isolated-kernel split of one model's train step, and the trace's shares."""
    trace = summary.get("trace_share") or {}
    body = [[k, f"{1e3 * v:.1f}", f"{100 * summary['fraction_of_step'][k]:.0f}%"]
            for k, v in summary["seconds"].items()]
    body += [[f"trace: {k}", "-", f"{100 * v:.0f}%"] for k, v in trace.items()]
    return _table(["part", "ms per step", "share"], body)


def ensemble_table(rows: list[dict]) -> str:
    """Members K, mapping, member-images/s in one step, K separate steps' rate, speed-up."""
    body = []
    for r in rows:
        ours = "skipped" if r.get("skipped") else f"{r['member_images_per_s']:.1f}"
        speedup = "-" if r.get("skipped") else f"{r['speedup']:.2f}x"
        body.append([r["model"], str(r["members"]), r["mapping"], ours,
                     f"{r['separate_member_images_per_s']:.1f}", speedup, f"{r['compile_seconds']:.1f}"])
    return _table(["model", "K", "mapping", "member images/s, one step", "K separate steps", "speed-up",
                   "first step s"], body)


def main(argv: list[str]) -> int:
    """Prints the tables of the JSON-lines files `argv`; returns the exit status."""
    if not argv:
        raise ConfigError("name one or more JSON-lines files of benchmark results")
    lines = []
    for path in argv:
        try:
            with open(path) as f:
                lines += [json.loads(line) for line in f if line.strip().startswith("{")]
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    machines = [l for l in lines if l.get("benchmark") == "machine" and "matmul_gflops_per_s" in l]
    steps = [l for l in lines if l.get("benchmark") == "train_step" and "framework" in l
             and "config" not in l]
    pipeline = [l for l in lines if l.get("benchmark") == "input_pipeline" and "workers" in l]
    pipeline_summary = next((l for l in lines if l.get("benchmark") == "input_pipeline"
                             and l.get("part") == "summary"), None)
    profiles = [l for l in lines if l.get("benchmark") == "profile_step" and l.get("part") == "summary"]
    ensembles = [l for l in lines if l.get("benchmark") == "ensemble"]
    out = []
    if machines:
        out.append(machine_text(machines[0]))
    if steps:
        out.append(train_step_table(steps))
    if ensembles:
        out.append(ensemble_table(ensembles))
    if pipeline:
        out.append(input_pipeline_table(pipeline, pipeline_summary))
    for p in profiles:
        out.append(f"{p['model']}: train step {1e3 * p['train_step_seconds']:.0f} ms "
                   f"(batch {p['batch']}, {p['image_size']}px)\n\n" + profile_table(p))
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    cli.run(main, "benchmarks.tables")
