"""Naming a dataset: a built-in name, a name given to :func:`register_dataset`, or a folder path.

A *dataset value* (a notebook's ``dataset`` parameter, ``workbench train --dataset``) is read as

- a built-in name (``DATASET_INFO``: ``digits``, ``digit-scenes``, ``cifar10``, ...);
- a registered name (:func:`register_dataset`); modules listed in ``$WORKBENCH_DATASETS``
  (comma-separated) are imported the first time a name is not found, so their registrations reach
  notebook kernels, sweep points and torchrun workers too;
- otherwise, when it holds a ``/`` or starts with ``~`` or ``.``, a folder path
  (:mod:`workbench.data.folders`); write ``./name`` for a folder in the working directory.

:func:`describe_dataset` resolves a value without loading any image (a folder is scanned and
validated); :func:`check_dataset` is what parameter checks call before any work starts.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .folder_scan import FOLDER_SPLITS
from .folders import FOLDER_OPTIONS, open_folder_dataset, open_scan

PLUGINS_ENV_VAR = "WORKBENCH_DATASETS"
TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class RegisteredDataset:
    name: str
    factory: Callable[..., Dataset]
    task: str
    splits: tuple[str, ...]
    options: tuple[str, ...] | None  # None: the factory takes any keyword


_REGISTRY: dict[str, RegisteredDataset] = {}
_plugins_loaded = False


def _factory_options(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    params = list(inspect.signature(factory).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def register_dataset(name: str, factory: Callable[..., Dataset], *, task: str = "classification",
                     splits: tuple[str, ...] = FOLDER_SPLITS, replace: bool = False) -> None:
    """Make ``name`` a dataset every notebook, ``get_dataset`` and ``workbench train`` accept.

    ``factory(split, **options)`` returns a ``torch.utils.data.Dataset`` of ``(image, label)`` items
    (``label`` an int for classification, an int64 ``(H, W)`` mask for segmentation) with a
    ``num_classes`` attribute; ``classes``, ``mean``/``std`` (per channel) and ``ignore_index`` are
    used when present. The options it accepts are read from its signature. A built-in name, a name
    holding ``/``, or a name already registered (unless ``replace``) is refused.
    """
    from . import DATASET_INFO

    if not isinstance(name, str) or not name or _looks_like_path(name):
        raise ValueError(f"name={name!r} is not valid; allowed: a non-empty string without '/' that does not "
                         "start with '~' or '.' (those name folders)")
    if name in DATASET_INFO or (name in _REGISTRY and not replace):
        raise ValueError(f"name={name!r} is already a dataset; allowed: a new name, or replace=True for a "
                         "registered one")
    if not callable(factory):
        raise ValueError(f"factory={factory!r} is not valid; allowed: a callable factory(split, **options)")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; allowed: {', '.join(map(repr, TASKS))}")
    if not splits or not all(isinstance(s, str) for s in splits):
        raise ValueError(f"splits={splits!r} is not valid; allowed: a non-empty tuple of split names")
    _REGISTRY[name] = RegisteredDataset(name, factory, task, tuple(splits), _factory_options(factory))


def unregister_dataset(name: str) -> None:
    """Forget a name given to :func:`register_dataset` (unknown names raise ``ValueError``)."""
    if name not in _REGISTRY:
        raise ValueError(f"name={name!r} is not registered; registered: {', '.join(_REGISTRY) or '(none)'}")
    del _REGISTRY[name]


def registered_datasets() -> list[str]:
    """Names given to :func:`register_dataset` (after importing the ``$WORKBENCH_DATASETS`` modules)."""
    _load_plugins()
    return list(_REGISTRY)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV_VAR, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"${PLUGINS_ENV_VAR} names module {module!r}, which cannot be imported ({exc}); "
                             "expected importable modules that call register_dataset") from None


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.startswith(("~", "."))


@dataclass(frozen=True)
class DatasetRef:
    """What a dataset value names, known without loading images."""

    value: str  # as get_dataset takes it: the name, or the folder's absolute path
    kind: str  # "builtin" | "registered" | "folder"
    task: str
    splits: tuple[str, ...]
    options: tuple[str, ...] | None  # None: any keyword
    num_classes: int | None  # None: known once built (registered datasets)

    @property
    def label(self) -> str:
        """A short name for tables and figure legends (a folder's last path component)."""
        return Path(self.value).name if self.kind == "folder" else self.value


def _unknown(value: Any) -> ValueError:
    from . import DATASET_INFO

    names = [*DATASET_INFO, *_REGISTRY]
    hint = (f"; a folder {value!r} exists here: write ./{value}"
            if isinstance(value, str) and value and Path(value).is_dir() else "")
    return ValueError(f"name={value!r} is not valid; allowed: {', '.join(map(repr, names))}, a name given to "
                      f"register_dataset, or a folder path (holding '/', e.g. ./my-images){hint}")


def describe_dataset(value: Any) -> DatasetRef:
    """Resolve a dataset value (see the module docstring); a folder is scanned and must be valid."""
    from . import DATASET_INFO

    if not isinstance(value, str):
        raise _unknown(value)
    if value in DATASET_INFO:
        info = DATASET_INFO[value]
        return DatasetRef(value, "builtin", info.task, tuple(info.splits), tuple(info.options), info.num_classes)
    if value not in _REGISTRY:
        _load_plugins()
    if value in _REGISTRY:
        reg = _REGISTRY[value]
        return DatasetRef(value, "registered", reg.task, reg.splits, reg.options, None)
    if not _looks_like_path(value):
        raise _unknown(value)
    scan = open_scan(value, task=None)
    return DatasetRef(str(scan.root), "folder", scan.task, FOLDER_SPLITS, tuple(FOLDER_OPTIONS),
                      scan.num_classes or len(scan.classes))


def check_dataset(value: Any, task: str | None = None) -> str:
    """``value`` as :func:`get_dataset` takes it (a folder as its absolute path), after checking it
    names a dataset of ``task``; ``ValueError`` with the path and what was expected otherwise."""
    ref = describe_dataset(value)
    if task is not None and ref.task != task:
        raise ValueError(f"dataset {value!r} is a {ref.task} dataset; expected a {task} dataset here")
    return ref.value


def accepted_options(value: str, **candidates: Any) -> dict[str, Any]:
    """The ``candidates`` the dataset named ``value`` takes (a preset's ``size`` or ``length`` applies
    only to datasets that have that option); ``None`` values are dropped."""
    options = describe_dataset(value).options
    return {k: v for k, v in candidates.items() if v is not None and (options is None or k in options)}


def open_external(value: Any, split: str, **options: Any) -> Dataset:
    """A registered or folder dataset (what ``get_dataset`` calls for names not built in)."""
    ref = describe_dataset(value)
    if split not in ref.splits:
        raise ValueError(f"split={split!r} is not valid; allowed: {', '.join(map(repr, ref.splits))}")
    if ref.kind == "folder":
        return open_folder_dataset(ref.value, split, **options)
    if ref.options is not None:
        unknown = sorted(set(options) - set(ref.options))
        if unknown:
            raise ValueError(f"option(s) {', '.join(unknown)} not valid for dataset {value!r}; "
                             f"allowed: {', '.join(ref.options) or '(none)'}")
    dataset = _REGISTRY[value].factory(split, **options)
    return _checked(dataset, ref, split)


def _checked(dataset: Any, ref: DatasetRef, split: str) -> Dataset:
    """A factory's result with the attributes the workbench reads, filled where it has none."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError(f"dataset {ref.value!r}: the factory returned {type(dataset).__name__}; expected a "
                         "torch Dataset with __len__ and __getitem__")
    num_classes = getattr(dataset, "num_classes", None)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"dataset {ref.value!r}: the factory's dataset has num_classes={num_classes!r}; expected "
                         "an int >= 2 attribute")
    defaults = {"name": ref.value, "split": split, "task": ref.task,
                "classes": tuple(str(i) for i in range(num_classes)),
                "ignore_index": 255 if ref.task == "segmentation" else None}
    for attr, default in defaults.items():
        if not hasattr(dataset, attr):
            setattr(dataset, attr, default)
    return dataset
