"""Configs: YAML + overrides, every key and type checked, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from robustlab.config import TrainConfig, dump_config, load_config, parse_override
from robustlab.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig) and cfg.name


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("epochs: 3\noptim:\n  lr: 0.05\n  name: sgd\ndata:\n  name: digits\n")
    cfg = load_config(path, ["optim.lr=0.01", "data.options={a: 1}", "optim.milestones=[1, 2.5]"])
    assert cfg.name == "exp" and cfg.epochs == 3 and cfg.optim.lr == 0.01
    assert cfg.data.name == "digits" and cfg.data.options == {"a": 1}
    assert cfg.optim.milestones == [1.0, 2.5] and cfg.model.name == "small_cnn"  # default kept


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["epochs=4", "recipe.options={eps: 0.3}", "optim.grad_clip=1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("epoch=5", r"unknown config key 'epoch'; did you mean 'epochs'"),
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        ("dta.name=x", r"unknown config key 'dta'; did you mean 'data'"),
        (
            "model.activation=silu",
            r"unknown config key 'model.activation'.*valid keys under model: name, act, options",
        ),
        ("epochs=ten", r"epochs: expected an integer, got 'ten'"),
        ("epochs=2.5", r"epochs: expected an integer"),
        ("optim.lr=fast", r"optim.lr: expected a number"),
        ("data.flip=1", r"data.flip: expected true or false"),
        ("optim.milestones=3", r"optim.milestones: expected a list"),
        ("optim.name=sdg", r"optim.name: 'sdg' is not one of sgd, adam, adamw; did you mean 'sgd'"),
        ("optim.schedule=cosin", r"did you mean 'cosine'"),
        ("epochs=0", r"epochs must be >= 1"),
        ("optim.lr=-1", r"optim.lr must be > 0"),
        ("label_smoothing=1.5", r"label_smoothing must lie in \[0, 1\)"),
        ("amp=fp8", r"amp: 'fp8' is not one of off, bf16, fp16"),
        ("device=tpu", r"device must be auto, cpu, cuda or cuda:N"),
        ("data=3", r"'data.' must be a mapping|'data' must be a mapping"),
        ("epochs", r"must look like key=value"),
        ("=3", r"empty key"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "nested.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.1, "momentun": 0.9}}))
    with pytest.raises(ConfigError, match="'optim.momentun'; did you mean 'optim.momentum'"):
        load_config(tmp_path / "nested.yaml")


def test_parse_override_uses_yaml_types():
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=hello=world") == (["x"], "hello=world")
