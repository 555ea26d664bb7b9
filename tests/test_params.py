import math

import pytest

from workbench.params import COMMON, Param, literal_assignments, parse_cli_value, validate


def test_types_bounds_choices():
    spec = {**COMMON, "epochs": Param(int, min=1, nullable=True), "lr": Param(float, min=0.0),
            "levels": Param(list, item_type=float, min=0.0)}
    ok = validate({"preset": "quick", "device": "cpu", "seed": 0, "epochs": None, "lr": 1, "levels": [0, 0.5]},
                  spec)
    assert ok["lr"] == 1.0 and isinstance(ok["lr"], float)
    assert ok["levels"] == [0.0, 0.5]
    with pytest.raises(ValueError, match=r"epochs=-1 .*>= 1"):
        validate({"epochs": -1}, spec)
    with pytest.raises(ValueError, match=r"epochs=True has type bool"):
        validate({"epochs": True}, spec)
    with pytest.raises(ValueError, match=r"preset='slow'.*'quick', 'full'"):
        validate({"preset": "slow"}, spec)
    with pytest.raises(ValueError, match=r"lr=nan must be finite"):
        validate({"lr": math.nan}, spec)
    with pytest.raises(ValueError, match=r"levels\[1\]=-0.1"):
        validate({"levels": [0.1, -0.1]}, spec)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) nosuch.*allowed: "):
        validate({"nosuch": 1}, spec)
    with pytest.raises(ValueError, match=r"device='gpu'"):
        validate({"device": "gpu"}, spec)


def test_cli_values():
    assert parse_cli_value("0.1") == 0.1
    assert parse_cli_value("-1") == -1
    assert parse_cli_value("[1, 2]") == [1, 2]
    assert parse_cli_value("None") is None
    assert parse_cli_value("resnet20") == "resnet20"


def test_parameters_cell_only_literals():
    assert literal_assignments("a = 1\nb = 'x'\nc = [1, 2.5]\nd = None\n") == {"a": 1, "b": "x", "c": [1, 2.5],
                                                                                 "d": None}
    with pytest.raises(ValueError, match="not a literal"):
        literal_assignments("a = 1\nb = a * 2\n")
    with pytest.raises(ValueError, match="only `name = literal`"):
        literal_assignments("import os\n")


def test_list_elements_checked_against_choices_and_open_bounds():
    spec = {"norms": Param(list, item_type=str, choices=("bn", "iebn", "none")),
            "momentum": Param(float, min=0.0, max=1.0, max_open=True), "lr": Param(float, min=0.0, min_open=True)}
    assert validate({"norms": ["bn", "none"], "momentum": 0.0, "lr": 1e-9}, spec)["norms"] == ["bn", "none"]
    with pytest.raises(ValueError, match=r"norms\[1\]='gn' is not allowed; allowed: list of str each one of 'bn'"):
        validate({"norms": ["bn", "gn"]}, spec)
    with pytest.raises(ValueError, match=r"momentum=1.0 is out of range; allowed: float >= 0.0 < 1.0"):
        validate({"momentum": 1.0}, spec)
    with pytest.raises(ValueError, match=r"lr=0.0 is out of range; allowed: float > 0.0"):
        validate({"lr": 0.0}, spec)
    assert math.isnan(parse_cli_value("nan")) and parse_cli_value("-inf") == -math.inf
