"""The ``dataset`` parameter every notebook declares: a built-in name, a registered name or a folder.

The value is checked where every other parameter is (in the runner before a kernel starts, and in
the notebook before training): the name must exist, a folder must pass its scan, and the task must
be the notebook's. A folder path is made absolute, so a kernel started elsewhere finds it. A notebook's
``dataset = None`` means its preset's data (the shipped Fashion-MNIST subset for ``quick``, the papers' data for
``full``), whose files are checked when the parameters are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workbench.data import check_data_files, check_dataset
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


def fill_preset_dataset(params: dict[str, Any], presets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``params["dataset"]`` left ``None`` becomes the preset's (``presets[preset]["dataset"]``), and the
    files of an on-disk dataset (CIFAR, Cityscapes) are checked without loading them: a preset whose data
    is absent is refused with the missing path and the expected layout, before any training."""
    if params.get("dataset") is None:
        params["dataset"] = presets[params.get("preset", "quick")]["dataset"]
    check_preset_data(params["dataset"], params.get("preset", "quick"))
    return params


def check_preset_data(dataset: Any, preset: str = "quick") -> None:
    """``ValueError`` (naming the parameter and the preset) when ``dataset``'s files are missing."""
    try:
        check_data_files(dataset)
    except FileNotFoundError as exc:
        raise ValueError(f"parameter dataset={dataset!r} (preset {preset!r}): {exc}") from None
