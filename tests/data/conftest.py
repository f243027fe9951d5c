"""Fixtures for the data tests: a tiny phantom dataset (the real CT fixture is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mednets.data.phantoms import PhantomConfig, write_phantom_dataset


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 32^3 phantoms (10 mm voxels: the full 320 mm field of view), written once per session."""
    root = tmp_path_factory.mktemp("phantoms") / "ds"
    return write_phantom_dataset(root, 3, seed=7, config=PhantomConfig(shape=(32, 32, 32), absence_rates={}))
