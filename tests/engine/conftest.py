"""Tiny trained runs shared by the engine's tests (each trained once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mednets.config import load_config
from mednets.engine.training import run_training

TINY = {
    "sadaan_fast": ["model.overrides={grid_size: [16, 16, 16], base_channels: 4, feature_channels: 8}"],
    "dynunet": ["model.overrides={filters: [4, 8, 16, 32, 64]}", "data.patch_size=[32, 32, 32]"],
}


_RUNS: dict[str, Path] = {}


def _tiny_run(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of `name` trained for 2 steps on 4 small phantoms (trained once per test session)."""
    if name not in _RUNS:
        run_dir = tmp_path_factory.mktemp(name)
        config = load_config(None, [
            f"model.name={name}", *TINY[name],
            "data.phantoms={n_train: 4, n_test: 2, shape: [32, 32, 32]}", "data.val_fraction=0.25",
            "train.max_steps=2", "train.val_every=2", "train.batch_size=2",
        ])  # fmt: skip
        run_training(config, run_dir, progress=False)
        _RUNS[name] = run_dir
    return _RUNS[name]


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_sadaan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_run("sadaan_fast", tmp_path_factory)
