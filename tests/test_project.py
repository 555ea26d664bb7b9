"""Repository-level invariants: dependency lists agree, notebooks are clean and parameterised, no
module of the package imports a layer above its own."""

import ast
import re
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

from workbench.params import literal_assignments
from workbench.runner import load_spec, parameters_cell

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(pip_section) == sorted(wanted), "environment.yml pip list must equal pyproject deps + extras"
    assert {_name(r) for r in pip_section} == {_name(r) for r in wanted}


def test_torch_has_no_upper_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(r for r in project["dependencies"] if _name(r) == "torch")
    assert "<" not in torch_req and "==" not in torch_req


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ must hold the workbench notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: outputs must be stripped"
            assert cell.execution_count is None, f"{path.name}: execution counts must be cleared"
    defaults = literal_assignments(parameters_cell(nb).source)
    assert {"preset", "device", "seed"} <= set(defaults)
    assert defaults["preset"] == "quick"
    assert nb.metadata["kernelspec"]["language"] == "python"
    spec = load_spec(path)  # every default passes its own declared spec
    assert set(spec.spec) == set(defaults)


# The package's layers, bottom to top: a module imports its own layer and the layers below, never one
# above (a lower layer stays usable without the higher ones, and no import cycle crosses layers).
LAYERS = (
    {"__init__", "callbacks", "device", "errors", "io", "params", "progress", "report"},
    {"data"},
    {"nn"},
    {"models"},
    {"pruning"},
    {"noise"},
    {"probes"},
    {"train", "distributed"},
    {"recipe"},
    {"experiments", "benchmarks"},
    {"viz"},
    {"widgets"},
    {"runner", "sweep", "ray_executor"},
    {"cli", "train_cli", "lab"},
)
PACKAGE = ROOT / "workbench"


def _unit(module: str) -> str:
    """The top-level part of the package a dotted module name belongs to (``workbench.recipe.spec``: recipe)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported_units(path: Path) -> set[str]:
    """The parts of the package ``path`` imports (absolutely or relatively, at module level or inside
    functions)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    units = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            units |= {_unit(a.name) for a in node.names if a.name.split(".")[0] == "workbench"}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module == "workbench":
                units |= {a.name for a in node.names}
            elif module.startswith("workbench."):
                units.add(_unit(module))
    return units


def _layer_violations(layers: tuple[set[str], ...]) -> list[str]:
    rank = {unit: i for i, layer in enumerate(layers) for unit in layer}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if unit not in rank:
            problems.append(f"{path.relative_to(ROOT)}: workbench.{unit} is in no layer of LAYERS")
            continue
        problems += [f"{path.relative_to(ROOT)} imports workbench.{other}, a higher layer"
                     for other in sorted(_imported_units(path)) if rank.get(other, -1) > rank[unit]]
    return problems


def test_no_module_imports_a_layer_above_it():
    assert not _layer_violations(LAYERS), _layer_violations(LAYERS)


def test_the_layer_check_sees_an_upward_import():
    command_line_at_the_bottom = ({"train_cli"}, *(layer - {"train_cli"} for layer in LAYERS))
    problems = _layer_violations(command_line_at_the_bottom)
    assert "workbench/train_cli.py imports workbench.recipe, a higher layer" in problems


def test_train_cli_is_the_parser_and_launcher_only():
    """The run spec, its checks, callbacks and builder live in workbench.recipe; the command line stays short."""
    lines = (PACKAGE / "train_cli.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"workbench/train_cli.py has {lines} lines; allowed: at most 250"
