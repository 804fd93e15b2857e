"""Pipelines by name. A pipeline is a small class that turns a resolved config into a run.

```python
@register_pipeline
class PlanetoidGCN(Pipeline):
    name = "planetoid-gcn"
    description = "Semi-supervised node classification, 2-layer GCN (Kipf & Welling 2017)"
    config_class = PlanetoidGCNConfig
    def run(self, cfg, ctx): ...            # train + evaluate, return metrics
```
Pipeline modules are imported lazily (``PIPELINE_MODULES``) so that ``import threefold.pipelines``
stays cheap and one pipeline's missing optional dependency never breaks another.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

from threefold.datasets.errors import ConfigError, MissingExtraError
from threefold.pipelines.config import RunConfig
from threefold.pipelines.engine import RunContext

PIPELINE_MODULES: tuple[str, ...] = (
    "threefold.pipelines.planetoid_gcn",
    "threefold.pipelines.graphs_ssl",
    "threefold.pipelines.brats",
    "threefold.pipelines.bspnet",
    "threefold.pipelines.uni3dar",
    "threefold.pipelines.uni3dar_crystals",
    "threefold.pipelines.pointmae",
    "threefold.pipelines.registration",
    "threefold.pipelines.i2pmae",
    "threefold.pipelines.rapidseg",
)


class Pipeline:
    """Base class: subclasses set ``name``, ``description``, ``config_class`` and implement ``run``."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[RunConfig]] = RunConfig

    def run(self, cfg: Any, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, cfg: Any, ctx: RunContext, checkpoint: Path) -> dict[str, Any]:
        raise ConfigError(f"pipeline {self.name!r} has no separate evaluation; use `threefold run`")

    def predict(self, cfg: Any, checkpoint: Path, input: Path, out: Path) -> None:
        raise ConfigError(f"pipeline {self.name!r} does not support `threefold predict`")

    def load(self, cfg: Any, checkpoint: Path) -> Any:
        raise ConfigError(f"pipeline {self.name!r} has no Python inference entry point")

    def figures(self, cfg: Any, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """PNG figures of a finished run under ``run_dir/figures/`` (issue #11), called by ``threefold
        run`` in the main process before the report is written.

        Default: training/validation curves of every Lightning CSV log and a per-class bar chart when
        ``metrics`` holds ``"<family>/<class>"`` entries. Pipelines add their field's pictures with
        the helpers of :mod:`threefold.pipelines.figures` (and usually keep these via ``super()``).
        """
        from threefold.pipelines.figures import default_figures

        return default_figures(run_dir, metrics)


_REGISTRY: dict[str, Pipeline] = {}
_UNAVAILABLE: dict[str, str] = {}


def register_pipeline(cls: type[Pipeline]) -> type[Pipeline]:
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ConfigError(f"pipeline name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _import_all() -> None:
    for mod in PIPELINE_MODULES:
        if mod in _UNAVAILABLE:
            continue
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # listed ahead of being written
                _UNAVAILABLE[mod] = "not written yet"
                continue
            raise
        except MissingExtraError as exc:
            _UNAVAILABLE[mod] = str(exc)


def list_pipelines() -> list[Pipeline]:
    _import_all()
    return sorted(_REGISTRY.values(), key=lambda p: p.name)


def get_pipeline(name: str) -> Pipeline:
    _import_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown pipeline {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
