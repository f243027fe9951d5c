"""Typed configs: YAML with safe_load, unknown keys rejected by name, dotted overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from mednets.config import ExperimentConfig, load_config, parse_assignments, save_config, yaml_values
from mednets.errors import ConfigError, UnknownNameError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_becomes_typed_dataclasses(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "model: {name: unet3d}\ntrain: {lr: 1, max_minutes: 2.5}\ndata: {patch_size: [32, 32, 32]}\n")
    )
    assert isinstance(config, ExperimentConfig)
    assert config.model.name == "unet3d"
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.data.patch_size == (32, 32, 32)


def test_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match=r"train\.learning_rate.*unknown config key.*'lr'"):
        load_config(write(tmp_path, "train: {learning_rate: 0.1}\n"))


def test_wrong_type_and_invalid_choice_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps.*wrong type.*expected int"):
        load_config(write(tmp_path, "train: {max_steps: many}\n"))
    with pytest.raises(ConfigError, match=r"train\.precision.*one of \['fp32', 'bf16', 'fp16'\]"):
        load_config(None, ["train.precision=fp8"])


def test_overrides_parse_values_as_yaml() -> None:
    config = load_config(None, ["train.lr=3e-4", "data.phantoms.shape=[96,96,96]", "model.overrides.base_channels=8"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.data.phantoms.shape == (96, 96, 96)
    assert config.model.overrides == {"base_channels": 8}


def test_malformed_override_and_bad_yaml_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_key_value_assignments_parse_values_as_yaml() -> None:
    parsed = parse_assignments(["bilinear=true", "base_channels=8", "grid_size=[32, 32, 32]", "norm=instance"])
    assert parsed == {"bilinear": True, "base_channels": 8, "grid_size": [32, 32, 32], "norm": "instance"}
    assert yaml_values({"bilinear": "false", "out_channels": 13, "scale": "0.5"}) == {
        "bilinear": False, "out_channels": 13, "scale": 0.5}  # fmt: skip
    for bad in ("bilinear", "=1", "a=[1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_assignments([bad])


def test_saved_config_loads_back_equal(tmp_path: Path) -> None:
    config = load_config(None, ["name=x", "data.hu_window=[-100, 200]"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_every_shipped_config_loads_and_names_a_registered_model() -> None:
    from mednets.models import list_models

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        config = load_config(path)
        assert config.model.name in list_models(), path.name
