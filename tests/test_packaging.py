"""pyproject.toml declares exactly what the code imports: nothing missing, nothing unused."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Declared though nothing imports them: what the package runs rather than imports.
RUN_NOT_IMPORTED = {
    "jupyterlab": "`workbench lab` starts it with `python -m jupyterlab`",
    "anywidget": "plotly's FigureWidget needs it to display",
}
# Extras used as tools or engines rather than imports.
EXTRA_NOT_IMPORTED = {
    "pytest-timeout": "pytest plugin",
    "ruff": "linter run by `make test`",
    "kaleido": "plotly's image engine behind `fig.write_image` (`make images`)",
}

# Imported only where present, never declared: Triton ships with PyTorch's Linux CUDA builds and is
# used only on a CUDA device (the fused IEBN operator); declaring it would break installs elsewhere.
OPTIONAL_NOT_DECLARED = {"triton"}


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _top_level_imports(folder: Path) -> set[str]:
    local = {path.stem for path in folder.glob("*.py")}  # tests import their own helpers by name
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    skip = local | {"workbench"} | OPTIONAL_NOT_DECLARED
    return {name for name in names if name not in sys.stdlib_module_names and name not in skip}


def _distributions(modules: set[str]) -> set[str]:
    owners = importlib.metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in owners)
    assert not missing, f"imported but installed by no distribution: {missing}"
    return {_dist_name(owners[m][0]) for m in modules}


def _declared(*groups: str) -> set[str]:
    requirements = list(PROJECT["dependencies"]) if "run" in groups else []
    for group in groups:
        requirements += PROJECT["optional-dependencies"].get(group, [])
    return {_dist_name(r) for r in requirements}


def test_every_import_of_the_package_is_declared():
    imported = _distributions(_top_level_imports(ROOT / "workbench"))
    assert imported - _declared("run", "ray") == set()


def test_every_dependency_is_imported_or_run():
    imported = _distributions(_top_level_imports(ROOT / "workbench"))
    unused = _declared("run") - imported - set(RUN_NOT_IMPORTED)
    assert unused == set(), f"declared but never imported: {sorted(unused)}"


def test_running_needs_no_ray_browser_or_image_engine():
    assert {"ray", "playwright", "kaleido"} & _declared("run") == set()
    assert "ray" in _declared("ray")


def test_the_test_extra_covers_what_the_tests_import():
    imported = _distributions(_top_level_imports(ROOT / "tests") | _top_level_imports(ROOT / "scripts"))
    assert imported - _declared("run", "test", "ray") == set()  # make test installs the ray extra too
    unused = _declared("test", "images") - imported - set(EXTRA_NOT_IMPORTED)
    assert unused == set(), f"extra declared but never imported: {sorted(unused)}"


def test_license_is_an_spdx_expression():
    assert PROJECT["license"] == "MIT"
