"""Typed config resolution: defaults < shipped YAML < user file < key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import pytest

from threefold.datasets.errors import ConfigError
from threefold.pipelines.config import (
    RunConfig,
    config_from_dict,
    config_to_dict,
    parse_overrides,
    resolve_config,
    valid_keys,
)


@dataclass
class Model:
    hidden: int = 16
    dropout: float = 0.5
    widths: list[int] = field(default_factory=lambda: [32, 64])
    norm: Union[str, None] = None


@dataclass
class Cfg(RunConfig):
    name: str = "cora"
    model: Model = field(default_factory=Model)


def test_overrides_are_typed_by_the_schema():
    cfg = resolve_config(Cfg, overrides=["model.hidden=32", "model.dropout=1e-3", "trainer.max_epochs=7",
                                         "model.widths=[1, 2, 3]", "trainer.deterministic=false", "name=citeseer",
                                         "model.norm=batch", "trainer.devices=auto"])
    assert cfg.model.hidden == 32 and isinstance(cfg.model.hidden, int)
    assert cfg.model.dropout == pytest.approx(1e-3)
    assert cfg.trainer.max_epochs == 7 and cfg.trainer.deterministic is False
    assert cfg.model.widths == [1, 2, 3] and cfg.name == "citeseer" and cfg.model.norm == "batch"
    assert cfg.trainer.devices == "auto"
    assert resolve_config(Cfg, overrides=["trainer.devices=2"]).trainer.devices == 2


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        resolve_config(Cfg, overrides=["model.hiden=3"])
    msg = str(err.value)
    assert "model.hiden" in msg and "model.hidden" in msg and "trainer.max_epochs" in msg


@pytest.mark.parametrize("pair", ["model.hidden=abc", "trainer.deterministic=maybe", "model.widths=[1, x]", "model=3"])
def test_wrong_type_is_an_error(pair):
    with pytest.raises(ConfigError):
        resolve_config(Cfg, overrides=[pair])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.hidden"])


def test_yaml_file_layer_and_safe_load(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("model:\n  hidden: 64\ntrainer:\n  max_epochs: 3\n")
    cfg = resolve_config(Cfg, config_file=good, overrides=["trainer.max_epochs=4"])
    assert cfg.model.hidden == 64 and cfg.trainer.max_epochs == 4  # the command line wins
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(Cfg, config_file=evil)
    assert not (tmp_path / "pwned").exists()


def test_round_trip_through_plain_dict():
    cfg = resolve_config(Cfg, overrides=["model.hidden=5"])
    plain = config_to_dict(cfg)
    assert plain["model"]["hidden"] == 5 and isinstance(plain["trainer"], dict)
    assert config_from_dict(Cfg, plain) == cfg


def test_valid_keys_are_dotted_leaves():
    keys = valid_keys(Cfg)
    assert "model.hidden" in keys and "trainer.precision" in keys and "model" not in keys


def test_every_shipped_config_matches_its_schema():
    from threefold.pipelines.config import shipped_config_path
    from threefold.pipelines.registry import list_pipelines

    pipelines = list_pipelines()
    assert pipelines
    for pipe in pipelines:
        path = shipped_config_path(pipe.name)
        assert path.is_file(), f"pipeline {pipe.name} ships no {path.name}"
        resolve_config(pipe.config_class, pipe.name)  # raises on any unknown key or wrong type
