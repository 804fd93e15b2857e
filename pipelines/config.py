"""Typed run configuration: dataclass schemas, YAML files and ``key=value`` overrides.

Every pipeline declares a dataclass (a subclass of :class:`RunConfig`) whose fields are the valid
keys. A config is resolved in this order, each layer validated against the schema:

1. the dataclass defaults,
2. the pipeline's shipped YAML ``pipelines/configs/<pipeline>.yaml`` (the paper's recipe),
3. a user file given with ``--config FILE``,
4. ``key=value`` overrides with dotted keys (``trainer.max_epochs=5``, ``model.hidden=32``).

An unknown key or a value of the wrong type raises :class:`ConfigError` listing the valid keys.
YAML is read with ``yaml.safe_load`` only; values are never evaluated.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from threefold.datasets.errors import ConfigError

C = TypeVar("C", bound="RunConfig")


@dataclass
class TrainerConfig:
    """Options handed to ``lightning.Trainer`` (and the data loaders)."""

    max_epochs: int = 1
    max_steps: int = -1
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Union[int, str] = 1  # number of devices or "auto"
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    num_nodes: int = 1
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    accumulate_grad_batches: int = 1
    gradient_clip_val: Union[float, None] = None
    batch_size: int = 1
    num_workers: int = 0
    limit_train_batches: Union[int, float] = 1.0
    limit_val_batches: Union[int, float] = 1.0
    limit_test_batches: Union[int, float] = 1.0
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    # 0: checkpoint at the end of each epoch only (the engine warns when those saves cost more than the
    # training between them, as with one-step epochs on a GPU, and names the N to set)
    checkpoint_every_n_steps: int = 0
    deterministic: bool = True
    enable_progress_bar: bool = True
    # Synchronise BatchNorm statistics across processes. None (default): on when the run has several
    # processes on GPUs and the model has batch norm (torch.nn.SyncBatchNorm through Lightning);
    # true also synchronises several CPU (gloo) processes, through pipelines/sync_batchnorm.py's
    # AllReduceSyncBatchNorm (PyTorch's SyncBatchNorm needs GPU tensors).
    # See RunContext.trainer and docs/scaling.md.
    sync_batchnorm: Union[bool, None] = None
    # How, when synchronised: "auto" (PyTorch's SyncBatchNorm on GPUs, AllReduceSyncBatchNorm on CPU
    # processes), "torch" (GPUs only) or "allreduce" (either).
    sync_batchnorm_impl: str = "auto"


@dataclass
class RunConfig:
    """Keys shared by every pipeline."""

    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every leaf key of a config schema."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """Check ``value`` against annotation ``tp``, converting the few lossless cases (str→number, int→float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, root)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key {key!r}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        raise ConfigError(f"config key {key!r}: expected None, got {value!r}")
    if origin in (list, tuple):
        (arm, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        items = [_coerce(v, arm, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp}")


def _merge(obj: Any, values: dict[str, Any], root: type, prefix: str, source: str) -> None:
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise ConfigError(
                f"{source}: unknown config key {key!r}; valid keys: {', '.join(valid_keys(root))}"
            )
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {key!r} is a section; expected a mapping, got {value!r}")
            _merge(getattr(obj, name), value, root, f"{key}.", source)
        else:
            setattr(obj, name, _coerce(value, tp, key, root))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": "1"}, "c": "x"}`` (values stay strings; the schema types them)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair or pair.startswith("="):
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return tree


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def shipped_config_path(pipeline: str) -> Path:
    """Path of ``pipelines/configs/<pipeline>.yaml`` inside the installed package."""
    return Path(str(resources.files("threefold.pipelines") / "configs" / f"{pipeline}.yaml"))


def resolve_config(
    schema: type[C],
    pipeline: str | None = None,
    config_file: Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> C:
    """Build a config from defaults, the shipped YAML, a user file and overrides (in that order)."""
    cfg = schema()
    if pipeline is not None:
        shipped = shipped_config_path(pipeline)
        if shipped.is_file():
            _merge(cfg, read_yaml(shipped), schema, "", str(shipped))
    if config_file is not None:
        _merge(cfg, read_yaml(config_file), schema, "", str(config_file))
    if overrides:
        tree = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        _merge(cfg, tree, schema, "", "command line")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (safe to store in checkpoints and to dump as YAML)."""
    return dataclasses.asdict(cfg)


def config_from_dict(schema: type[C], values: dict[str, Any]) -> C:
    cfg = schema()
    _merge(cfg, values, schema, "", "stored config")
    return cfg


def dump_config(cfg: Any, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
