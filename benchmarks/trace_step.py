"""Where a jitted step's time goes inside XLA: a profiler trace of the real step, summed per HLO op.

:func:`trace_ops` runs a compiled function under ``jax.profiler`` a few times,
reads the trace back (``jax.profiler.ProfileData``), keeps the events named
after instructions of the optimized HLO's entry computation, and sums their
durations per instruction. :func:`categorize` sorts each instruction into a
kind of work from the HLO text (what its fused computation contains and the
JAX operation it came from, the ``op_name`` metadata):

- ``conv_dot_forward`` / ``conv_dot_gradient``: fusions holding a convolution
  or a dot (on CPU, XLA's YNNPACK fusions) and library calls for them (on GPU,
  cuDNN convolutions and cuBLAS GEMMs), forward when they come from the
  forward pass (``jvp(...)`` without ``transpose(``);
- ``max_pool_gradient``: ``select_and_scatter`` and the pieces XLA:CPU expands
  it into (iotas of element indices, a variadic reduce-window that tracks the
  argmax, the int32 index arrays, a scatter);
- ``pool_forward``: the other reduce-windows (max and average pooling);
- ``layout``: transposes and copies;
- ``other``: elementwise fusions, reductions, the loss and the optimizer.

Events of independent ops can run at the same time on different threads, so
the sums may exceed the step's wall time; read them as shares of the work.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Callable

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def parse_hlo(text: str) -> tuple[dict, dict]:
    """Parses optimized HLO text.

    Returns:
      (entry: ``{instruction name: {"opcode", "shape", "calls", "op_name", "target", "config"}}``
      of the ENTRY computation, computations: ``{computation name: set of opcodes in it}``).
    """
    entry, computations = {}, collections.defaultdict(set)
    current, in_entry = None, False
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current, in_entry = header.group(1), line.startswith("ENTRY")
            continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        computations[current].add(opcode)
        if in_entry:
            calls, op_name, target = _CALLS.search(rest), _OP_NAME.search(rest), _TARGET.search(rest)
            entry[name] = {"opcode": opcode, "shape": shape,
                           "calls": calls.group(1) if calls else None,
                           "op_name": op_name.group(1) if op_name else "",
                           "target": target.group(1) if target else "",
                           "config": "__ynn_fusion" if "__ynn_fusion" in rest else ""}
    return entry, dict(computations)


def categorize(op: dict, computations: dict) -> str:
    """The kind of work of one entry instruction (see the module docstring)."""
    inside = computations.get(op["calls"], set()) | {op["opcode"]}
    op_name = op["op_name"]
    backward = "transpose(" in op_name or not op_name
    if "select_and_scatter" in op_name or "select-and-scatter" in inside or "iota" in inside:
        return "max_pool_gradient"
    if op["shape"].startswith("s32[") and "," in op["shape"]:  # argmax indices gathered for the scatter
        return "max_pool_gradient"
    if "reduce-window" in inside:
        return "max_pool_gradient" if "s32[" in op["shape"] else "pool_forward"
    library_call = any(word in op["target"].lower() for word in ("conv", "gemm", "cublas", "matmul"))
    if "convolution" in inside or "dot" in inside or op["config"] or library_call:
        return "conv_dot_gradient" if backward else "conv_dot_forward"
    if inside <= {"transpose", "copy", "bitcast", "fusion", "parameter"} or "transpose" in op["opcode"]:
        return "layout"
    return "other"


def trace_ops(compiled_call: Callable[[], object], hlo_text: str, steps: int = 3) -> list[dict]:
    """Traces `steps` calls of ``compiled_call()`` (which must block) and sums events per HLO op.

    Returns:
      One dict per entry instruction seen in the trace, slowest first:
      ``{"op", "category", "op_name", "shape", "seconds_per_step"}``.
    """
    import jax

    entry, computations = parse_hlo(hlo_text)
    compiled_call()
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(steps):
            compiled_call()
        jax.profiler.stop_trace()
        path = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]
        profile = jax.profiler.ProfileData.from_file(path)
        totals = collections.Counter()
        for plane in profile.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in entry:
                        totals[event.name] += event.duration_ns
    return [{"op": name, "category": categorize(entry[name], computations), "op_name": entry[name]["op_name"],
             "shape": entry[name]["shape"], "seconds_per_step": ns / 1e9 / steps}
            for name, ns in totals.most_common()]
