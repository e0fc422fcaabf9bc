"""The import graph of our packages has no cycles: every module can be read (and changed) after the ones it uses."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("scalellm_jax", "checkpoints_tools", "pallas_kernels", "device_models")


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (at the top or inside a function)."""
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` depends on the submodule
                deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    graph = module_graph()
    assert len(graph) > 50  # the walk found our modules
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_packages_depend_one_way():
    """Top-level packages form no cycle either (checkpoints_tools uses scalellm_jax, never the reverse)."""
    packages: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, deps in module_graph().items():
        packages[module.split(".")[0]].update(d.split(".")[0] for d in deps if d.split(".")[0] != module.split(".")[0])
    assert "checkpoints_tools" not in packages["scalellm_jax"]
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages))
