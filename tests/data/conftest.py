"""Fixtures for the data tests: a tiny phantom dataset and small volumes with oblique geometry.

The real CT fixture is in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.data.volume import Volume


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 32^3 phantoms (10 mm voxels: the full 320 mm field of view), written once per session."""
    root = tmp_path_factory.mktemp("phantoms") / "ds"
    return write_phantom_dataset(root, 3, seed=7, config=PhantomConfig(shape=(32, 32, 32), absence_rates={}))


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """An RAS affine rotated 17 degrees in-plane, anisotropic spacing (0.8, 0.9, 2.5) mm, off-centre origin."""
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-101.3, 47.77, -12.125]
    return affine


@pytest.fixture
def make_volume() -> Callable[..., Volume]:
    """Factory of a seeded ``[5, 6, 7]`` volume of HU-like integers with the given affine and dtype."""

    def make(affine: np.ndarray, dtype: type = np.int16) -> Volume:
        rng = np.random.default_rng(0)
        return Volume(rng.integers(-1000, 1500, size=(5, 6, 7)).astype(dtype), affine)

    return make
