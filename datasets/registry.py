"""Datasets by name, for ``threefold list`` and for pipelines that take ``dataset=<name>``.

A dataset registers its class once, at import of its module::

    @register_dataset("semantickitti", "SemanticKITTI scans and labels (official layout)", modality="points")
    class SemanticKITTI(torch.utils.data.Dataset): ...

Every registered class is constructed as ``cls(root, split=..., **options)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, TypeVar

from threefold.datasets.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str
    modality: str  # points | volume | graph | molecule | mesh
    cls: type


_REGISTRY: dict[str, DatasetEntry] = {}

# Modules whose import registers datasets; imported lazily by list_datasets()/get_dataset() so that
# `import threefold.datasets` stays cheap. A module whose optional dependency is missing is skipped.
DATASET_MODULES: tuple[str, ...] = (
    "threefold.datasets.pointclouds",
    "threefold.datasets.volumes",
    "threefold.datasets.molecules",
    "threefold.datasets.planetoid",
    "threefold.datasets.tu",
    "threefold.datasets.brats",
    "threefold.datasets.objects",
    "threefold.datasets.qm9",
    "threefold.datasets.imnet_hdf5",
    "threefold.datasets.semantickitti",
    "threefold.datasets.registration_phantoms",
    "threefold.datasets.hcp",
)


def register_dataset(name: str, description: str, modality: str) -> Callable[[type[T]], type[T]]:
    def wrap(cls: type[T]) -> type[T]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ConfigError(f"dataset name {name!r} is registered twice ({_REGISTRY[name].cls} and {cls})")
        _REGISTRY[name] = DatasetEntry(name, description, modality, cls)
        return cls

    return wrap


def _import_all() -> None:
    for mod in DATASET_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # not written yet
                continue
            raise


def list_datasets() -> list[DatasetEntry]:
    _import_all()
    return sorted(_REGISTRY.values(), key=lambda e: e.name)


def get_dataset(name: str) -> DatasetEntry:
    _import_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]
