"""The package layout: models never import the training machinery, dVAE imports nothing of the rest, and
no module imports itself back through a chain of imports (counting lazy imports inside functions too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ("dvae", "dalle.transformer", "dalle.reranker")
FORBIDDEN_BELOW_MODELS = ("dalle.train", "dalle.data", "dalle.pipeline", "dalle.generation", "dalle.feedback",
                          "dalle_tools")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["dalle_tools", *rel.parts[1:]] if rel.parts[0] == "tools" else list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules that `path` imports anywhere in it (a name imported from a package counts as
    its submodule when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    files = [p for d in ("dalle", "dvae", "tools") for p in (ROOT / d).rglob("*.py")] + [ROOT / "generate.py"]
    names = {module_name(p): p for p in files}
    return {name: first_party_imports(path, set(names)) - {name} for name, path in names.items()}


def test_model_packages_never_import_training_or_data():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith(MODEL_PACKAGES):
            bad = sorted(m for m in imports if m.startswith(FORBIDDEN_BELOW_MODELS))
            assert not bad, f"{module} imports {bad}"
        if module.startswith("dvae"):
            assert not [m for m in imports if m.startswith("dalle")], f"{module} imports {imports}"
    assert "dalle.train.engine" in graph and "dalle.transformer.model" in graph  # the walk saw the packages


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One chain of imports that leads back to its start, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_every_file_in_tools_does_something_when_run():
    # A helper module run by hand says which command it belongs to, rather than nothing or an import traceback.
    import subprocess
    import sys

    silent = [p.name for p in sorted((ROOT / "tools").glob("*.py"))
              if p.name != "__init__.py" and 'if __name__ == "__main__"' not in p.read_text()]
    assert not silent, f"tools without a __main__ block: {silent}"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_cases.py")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr and "tools/bench.py --cases" in done.stderr
