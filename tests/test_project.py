"""Repository-level invariants: dependency lists agree, notebooks are clean and parameterised."""

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
