"""The layering, read from the source's import statements (module level and inside functions):
imports point down. The kernels import nothing of fastrlhf; no trainer imports the built-in
task or another trainer; no import circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {"fastrlhf.algos.sft", "fastrlhf.algos.reward", "fastrlhf.algos.dpo", "fastrlhf.algos.grpo",
            "fastrlhf.algos.ppo"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "fastrlhf").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        mods["fastrlhf.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastrlhf modules `name` imports (from x import y: x.y when that is a module, else x)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


GRAPH = {}
_known = set(_modules())
for _name, _path in _modules().items():
    GRAPH[_name] = _imports(_name, _path, _known)


def test_the_graph_was_read():
    assert GRAPH["fastrlhf.algos.grpo"] >= {"fastrlhf.algos.online", "fastrlhf.algos.update", "fastrlhf.algos.batch"}


def test_kernels_import_nothing_of_fastrlhf():
    for name, deps in GRAPH.items():
        if name.startswith("fastrlhf.kernels"):
            assert all(d.startswith("fastrlhf.kernels") for d in deps), (name, deps)


def test_no_algorithm_imports_the_built_in_task_or_another_trainer():
    for name, deps in GRAPH.items():
        if name.startswith("fastrlhf.algos"):
            assert not any(d.startswith("fastrlhf.tasks") for d in deps), (name, deps)
            assert not (deps & TRAINERS), (name, deps & TRAINERS)


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if dep.startswith(node + "."):  # a package importing its own submodule is not a circle
                continue
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
