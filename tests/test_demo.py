"""`mednets demo`: its config, its time budget, and its care with output folders (the run itself: tests/reports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mednets.cli import main
from mednets.demo import DEFAULT_CONFIG, demo_config, run_demo
from mednets.errors import ConfigError


def test_demo_config_is_sadaan_fast_within_the_fifteen_minutes() -> None:
    config = demo_config()
    assert DEFAULT_CONFIG.name == "sadaan_demo.yaml"
    assert config.model.name == "sadaan_fast"
    assert config.train.max_minutes is not None and config.train.max_minutes <= 12  # the rest of 15 min: measured
    assert config.data.phantoms.n_test >= 8


def test_minutes_rescale_the_budget_and_the_steps_together() -> None:
    base = demo_config()
    half = demo_config(minutes=base.train.max_minutes / 2)
    assert half.train.max_minutes == base.train.max_minutes / 2
    assert half.train.max_steps == round(base.train.max_steps / 2)
    assert demo_config(minutes=0.001).train.max_steps >= 1
    with pytest.raises(ConfigError, match="must be positive"):
        demo_config(minutes=0)


def test_demo_refuses_a_folder_that_holds_something_else(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not a demo")
    with pytest.raises(ConfigError, match="holds no earlier demo"):
        run_demo(tmp_path, echo=lambda _: None)
    assert (tmp_path / "precious.txt").is_file()


def test_missing_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "demo config not found" in capsys.readouterr().err
