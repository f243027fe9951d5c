"""Shared fixtures: paths to the real data beside the project, deterministic seeds."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _preprocessing_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Preprocessed datasets go to a temporary cache, never the user's `~/.cache/mednets`."""
    import os

    os.environ["MEDNETS_CACHE"] = str(tmp_path_factory.mktemp("mednets-cache"))


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


# openslide-python's source distribution, fetched by `make` (the Makefile's install step) from PyPI.
SLIDE_SDIST = Path(sys.prefix) / "test-data" / "openslide_python-1.4.7.tar.gz"


@pytest.fixture(scope="session")
def real_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `small.svs` (a real 16x16 JPEG crop of OpenSlide's CMU-1 slide, Aperio SVS, AppMag 20,
    MPP 0.499) and `unreadable.svs` (its tile's JPEG header broken), from openslide-python 1.4.7's sdist."""
    if not SLIDE_SDIST.is_file():
        pytest.skip(f"{SLIDE_SDIST} is missing: `make test` fetches it (pip download openslide-python==1.4.7)")
    folder = tmp_path_factory.mktemp("real_slides")
    with tarfile.open(SLIDE_SDIST) as archive:
        for name in ("small.svs", "unreadable.svs"):
            member = archive.getmember(f"openslide_python-1.4.7/tests/fixtures/{name}")
            (folder / name).write_bytes(archive.extractfile(member).read())
    return folder


@pytest.fixture(autouse=True)
def _no_histology_samples(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Denoising runs in tests train on the IHC image alone (fast, the same on every machine); the tests of the
    pip-shipped images (tests/data/test_histology_samples.py) point MEDNETS_HISTOLOGY_SAMPLES elsewhere."""
    monkeypatch.setenv("MEDNETS_HISTOLOGY_SAMPLES", str(tmp_path_factory.getbasetemp() / "no-histology-samples"))
