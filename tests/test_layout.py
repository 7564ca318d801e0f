"""The tree's layering, read from the source: the library never imports a
command, a command never imports another command, the kernels stand alone,
and the library's modules import each other without a cycle."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ROOTS = {"fast_dvla": ROOT, "fast_dvla_kernels": os.path.join(ROOT, "kernels"),
                "fast_dvla_eval": os.path.join(ROOT, "eval")}


def modules() -> dict[str, str]:
    """``{dotted module name: file}`` for every module of the three packages."""
    found = {}
    for package, base in SOURCE_ROOTS.items():
        for folder, _, files in os.walk(os.path.join(base, package)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), base)[:-3].replace(os.sep, ".")
                    found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


MODULES = modules()


def imports_of(module: str, top_level_only: bool = False) -> set[str]:
    """The project modules ``module`` imports (relative imports resolved); with ``top_level_only``,
    only the imports that run when it is imported (not those inside functions)."""
    path = MODULES[module]
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n in MODULES and n != module}


def is_command(module: str) -> bool:
    return module.startswith(("fast_dvla.commands.", "fast_dvla_eval.")) and not module.endswith("__init__")


def test_the_three_packages_are_found():
    assert {"fast_dvla.policy", "fast_dvla_kernels.triton_block_attention", "fast_dvla_eval.bench_libero",
            "fast_dvla.commands.export"} <= set(MODULES)


LIBRARY = sorted(m for m in MODULES if (m == "fast_dvla" or m.startswith("fast_dvla."))
                 and not is_command(m) and m not in ("fast_dvla.cli", "fast_dvla.commands"))


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_imports_no_command(module):
    bad = {m for m in imports_of(module) if is_command(m) or m.startswith("fast_dvla_eval") or m == "fast_dvla.cli"}
    assert not bad, f"{module} imports commands {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if is_command(m)))
def test_a_command_imports_no_other_command(module):
    bad = {m for m in imports_of(module) if is_command(m) or m == "fast_dvla.cli"}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_the_kernels_import_nothing_of_ours():
    for module in (m for m in MODULES if m.startswith("fast_dvla_kernels")):
        assert all(m.startswith("fast_dvla_kernels") for m in imports_of(module)), module


def test_no_import_cycle_among_library_modules():
    graph = {m: imports_of(m, top_level_only=True) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            # a package imports its submodules by design: only module -> module edges can cycle
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                cycle = path[path.index(nxt):] + [nxt]
                if not any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    raise AssertionError(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
