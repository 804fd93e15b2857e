"""Pipelines: the engine, the shared metric layer, configs and the ``threefold`` CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(name: str, checkpoint: str | Path) -> Any:
    """Inference without the CLI: the pipeline's predictor (an object with ``predict(...)``) for a checkpoint.

    >>> predictor = load("planetoid-gcn", "runs/planetoid-gcn/<stamp>/seed0/checkpoints/last.ckpt")
    """
    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.registry import get_pipeline

    pipe = get_pipeline(name)
    return pipe.load(resolve_config(pipe.config_class, pipe.name), Path(checkpoint))
