"""Code shape: no function of the package is longer than ``MAX_FUNCTION_LINES``.

A function's length runs from its ``def`` line to its last line, docstring included (decorators
not counted): ``end_lineno - lineno + 1`` of its ``ast`` node. Methods and nested functions count
on their own, and an enclosing function's length includes theirs.
"""

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "workbench"
MAX_FUNCTION_LINES = 80


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """``(qualified name, def line, length in lines)`` of every function and method in ``source``,
    nested ones named ``outer.inner`` and methods ``Class.method``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """The functions of ``source`` longer than ``limit`` lines, as :func:`function_lengths` gives them."""
    return [entry for entry in function_lengths(source) if entry[2] > limit]


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_of_the_package_is_over_the_limit():
    assert _package_files(), f"no Python files under {PACKAGE}"
    over = []
    for path in _package_files():
        rel = path.relative_to(ROOT).as_posix()
        for name, line, length in long_functions(path.read_text(encoding="utf-8")):
            over.append(f"{rel}:{line} {name}: {length} lines")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(over)


def _function(name: str, body_lines: int, indent: str = "") -> str:
    """Source of a function of exactly ``body_lines + 1`` lines (its ``def`` line, a docstring, assignments)."""
    lines = [f"def {name}():", '    """A docstring line."""']
    lines += [f"    x{i} = {i}" for i in range(body_lines - 1)]
    return textwrap.indent("\n".join(lines), indent) + "\n"


def test_function_lengths_count_from_def_to_last_line_docstring_included():
    source = "import os\n\n\n" + "@staticmethod\n" + _function("ninety", 89) + "\n\n" + _function("eighty", 79)
    assert function_lengths(source) == [("ninety", 5, 90), ("eighty", 97, 80)]


def test_a_synthetic_90_line_function_is_reported_and_an_80_line_one_is_not():
    source = _function("long_one", 89) + "\n\n" + _function("at_the_limit", 79)
    assert long_functions(source) == [("long_one", 1, 90)]
    assert long_functions(_function("at_the_limit", 79)) == []


def test_long_methods_and_nested_functions_are_reported_by_qualified_name():
    method = "class Trainer:\n" + _function("run", 89, indent="    ")
    assert long_functions(method) == [("Trainer.run", 2, 90)]
    outer = "def outer():\n" + _function("inner", 85, indent="    ") + "    return inner\n"
    assert long_functions(outer) == [("outer", 1, 88), ("outer.inner", 2, 86)]
    coroutine = _function("fetch", 95).replace("def fetch", "async def fetch")
    assert long_functions(coroutine) == [("fetch", 1, 96)]
