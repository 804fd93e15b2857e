"""Pipelines: the engine, the shared metric layer, configs and the ``threefold`` CLI."""
