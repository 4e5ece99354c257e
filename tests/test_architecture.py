"""The package's import graph: no cycles, one place that chooses the job, predict apart from training.

The graph is read from the source (every ``import`` and ``from ... import``,
at module level and inside functions), so a lazy import that would close a
cycle counts too.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = "imgclf_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package (packages as their __init__)."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}. ``from a import b`` names ``a.b`` when that is a module."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # import a.b.c of a non-module c
                if target in modules and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a] of `graph`, or None (depth-first search, colours)."""
    colour = {node: 0 for node in graph}  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_and_the_graph_is_real():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    # Known edges, so an import graph that parsed nothing would fail here.
    assert "imgclf_jax.driver" in graph["imgclf_jax.loop"]
    assert "imgclf_jax.errors" in graph["imgclf_jax.config"]
    assert "imgclf_jax.ensemble.steps" in graph["imgclf_jax.ensemble.job"]


def test_only_the_run_chooses_between_the_plain_and_the_ensemble_job():
    graph = import_graph()
    jobs = {"imgclf_jax.plain", "imgclf_jax.ensemble.job"}
    importers = sorted(m for m, edges in graph.items() if edges & jobs)
    assert importers == ["imgclf_jax.loop"]


@pytest.mark.parametrize("tool", ["imgclf_jax.predict", "imgclf_jax.vote", "imgclf_jax.results",
                                  "imgclf_jax.summary", "imgclf_jax.preview", "imgclf_jax.channel_stats"])
def test_tools_that_do_not_train_import_no_part_of_training(tool):
    training = {"imgclf_jax.loop", "imgclf_jax.driver", "imgclf_jax.plain", "imgclf_jax.ensemble.job",
                "imgclf_jax.workdir_lock"}
    assert not reachable(import_graph(), tool) & training
