"""Code shape limits: short functions and modules keep the code reviewable."""

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("ft_focal", "benchmarks", "tools")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def long_functions(source: str, path: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:name:lines`` for every function or method (decorators excluded) longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append(f"{path}:{node.name}:{lines}")
    return out


def _python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_no_function_is_longer_than_the_limit():
    offenders = []
    for path in _python_files(*SOURCE_DIRS):
        offenders += long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(offenders)


def test_no_library_module_is_longer_than_the_limit():
    offenders = []
    for path in _python_files("ft_focal"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            offenders.append(f"{path.relative_to(ROOT)}:{lines}")
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(offenders)


def test_the_checker_flags_a_function_one_line_over_the_limit():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    too_long = f"def f():\n{body}\n    return 0\n"
    just_right = f"def g():\n{body}\n"
    nested = "class C:\n" + textwrap.indent(too_long, "    ")
    assert long_functions(too_long, "synthetic.py") == [f"synthetic.py:f:{MAX_FUNCTION_LINES + 1}"]
    assert long_functions(just_right, "synthetic.py") == []
    assert long_functions(nested, "synthetic.py") == [f"synthetic.py:f:{MAX_FUNCTION_LINES + 1}"]
