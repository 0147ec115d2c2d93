"""The package's import graph: the layers of docs/design.md, and no cycles.

Read from the source: every `import` / `from ... import` at any depth is an edge, a function-local
import and one under `if __name__ == "__main__":` included (a launcher calls into the app; the app
never calls back into a launcher). `from package import name` is an edge to the submodule
`package.name` when there is one, else to the package's `__init__`. Then every module is imported
in one fresh interpreter.

Layers, each importing only its own and those below it:
  library   ft_focal.{optim, losses, metrics, models, data, sharpness, config, errors, files, version}
  app       ft_focal.{training, artifacts, evaluation, sweeps, integrations}
  commands  ft_focal.{commands, cli, train, evaluate} and the package itself (`ft_focal.load_model`)
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import ft_focal

ROOT = Path(ft_focal.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            edges.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {e for e in edges if e in modules and e != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


LIBRARY = ("optim", "losses", "metrics", "models", "data", "sharpness", "config", "errors", "files", "version")
APP = ("training", "artifacts", "evaluation", "sweeps", "integrations")
COMMANDS = ("commands", "cli", "train", "evaluate")
TOP_LEVEL_MODULES = {"__init__", "cli", "errors", "evaluate", "files", "train", "version"}


def _layer(module: str) -> int:
    """0 library, 1 app, 2 commands; a module outside every listed wing fails the test."""
    if module == "ft_focal":
        return 2
    wing = module.split(".")[1]
    for level, names in enumerate((LIBRARY, APP, COMMANDS)):
        if wing in names:
            return level
    raise AssertionError(f"{module} belongs to no wing: add it to one in docs/design.md and here")


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if _layer(target) > _layer(module))


def test_the_library_never_imports_the_app_and_the_app_never_imports_the_commands():
    assert _layer_violations(_graph()) == []


def test_the_layer_check_sees_an_upward_import():
    graph = {"ft_focal.losses": {"ft_focal.training.trainer"}, "ft_focal.training.trainer": {"ft_focal.train"},
             "ft_focal.train": {"ft_focal.commands.train"}}
    assert _layer_violations(graph) == ["ft_focal.losses -> ft_focal.training.trainer",
                                        "ft_focal.training.trainer -> ft_focal.train"]


def test_the_top_of_the_package_holds_only_the_named_modules():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_LEVEL_MODULES


def test_a_launcher_only_calls_into_the_command():
    """`accelerate launch -m ft_focal.train` / `-m ft_focal.evaluate`: the file is the module Accelerate
    starts and nothing else, so no app module can import it back."""
    for launcher, command in (("train", "ft_focal.commands.train"), ("evaluate", "ft_focal.commands.eval")):
        assert _graph()[f"ft_focal.{launcher}"] == {command}
        assert not [m for m, targets in _graph().items() if f"ft_focal.{launcher}" in targets]


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"  # an optional extra that is not installed
        "        if (exc.name or '').startswith('ft_focal'):\n"
        "            failed.append(f'{name}: {exc!r}')\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
