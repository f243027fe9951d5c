"""Shared fixtures: paths to the real data beside the project, deterministic seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_dir() -> Path:
    """`../shared` beside the project (real data and seed documents); tests using it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is missing: the real test data lives beside the project, not in the package")
    return SHARED


@pytest.fixture
def real_ct(shared_dir: Path) -> Path:
    """`../shared/data/ct`: the real CT, its segmentation and the DICOM series."""
    path = shared_dir / "data" / "ct"
    if not (path / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"{path} lacks the real CT files (see ../shared/data/README.md)")
    return path
