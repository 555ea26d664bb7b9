"""The ``dataset`` parameter every notebook declares: a built-in name, a registered name or a folder.

The value is checked where every other parameter is (in the runner before a kernel starts, and in
the notebook before training): the name must exist, a folder must pass its scan, and the task must
be the notebook's. A folder path is made absolute, so a kernel started elsewhere finds it.
"""

from __future__ import annotations

from typing import Any

from workbench.data import check_dataset
from workbench.params import Param


def dataset_param(task: str, help: str = "", nullable: bool = False) -> Param:
    """A ``Param`` accepting any dataset value of ``task`` (see :mod:`workbench.data.registry`)."""

    def validate_dataset(name: str, value: Any) -> str:
        try:
            return check_dataset(value, task=task)
        except ValueError as exc:
            raise ValueError(f"parameter {name}: {exc}") from None

    text = help or (f"a {task} dataset: a built-in name, a name given to register_dataset, or a folder path "
                    "(holding '/')")
    return Param(str, help=text, nullable=nullable, validator=validate_dataset)
