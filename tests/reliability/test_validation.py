"""Validation reads every voxel: truncated files, NaN and empty folders are named before training (issue 24)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mednets.data import validation
from mednets.data.dataset import load_dataset, validate_dataset
from mednets.data.io import read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import DatasetError

CASES = ("case_0", "case_1", "case_2")


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(Volume(array, np.diag([1.5, 1.5, 2.0, 1.0])), path)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Three training cases and one test case of 8³ voxels: float32 images, uint8 labels of ids 0 and 1."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for case in (*CASES, "test_0"):
        folder = "imagesTs" if case.startswith("test") else "imagesTr"
        _write(root / folder / f"{case}_0000.nii.gz", rng.normal(size=(8, 8, 8)).astype(np.float32))
        if folder == "imagesTr":
            _write(root / "labelsTr" / f"{case}.nii.gz", (rng.random((8, 8, 8)) > 0.5).astype(np.uint8))
    info = {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "CT"}, "numTraining": len(CASES)}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _truncate(path: Path, keep: int = -40) -> Path:
    """Cut the end off a file; the first bytes (a .nii.gz's header) stay readable."""
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _set_voxels(path: Path, index: tuple[np.ndarray, ...] | tuple[int, ...], value: float) -> None:
    volume = read_volume(path)
    volume.array[index] = value
    write_volume(volume, path)


def test_a_clean_dataset_has_no_problems_in_either_mode(dataset: Path) -> None:
    assert validate_dataset(dataset) == []
    assert validate_dataset(dataset, quick=True) == []
    assert validate_dataset(dataset, progress=True) == []


def test_a_truncated_image_is_named_and_training_refuses_it(dataset: Path) -> None:
    truncated = _truncate(dataset / "imagesTr" / "case_1_0000.nii.gz")
    problems = validate_dataset(dataset)
    assert len(problems) == 1
    assert problems[0].startswith(f"{truncated}: cannot read image file (")
    assert "ended before the end-of-stream marker" in problems[0]
    with pytest.raises(DatasetError, match=r"case_1_0000\.nii\.gz: cannot read image file"):
        load_dataset(dataset)


def test_quick_mode_reads_headers_only_so_a_truncated_file_passes(dataset: Path) -> None:
    _truncate(dataset / "imagesTr" / "case_1_0000.nii.gz")
    assert validate_dataset(dataset, quick=True) == []  # the header is intact: only a full read sees the cut


def test_quick_mode_reads_no_voxels(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_voxel_reading(path: Path) -> Volume:
        raise AssertionError(f"quick mode read the voxels of {path}")

    monkeypatch.setattr(validation, "read_volume", no_voxel_reading)
    assert validate_dataset(dataset, quick=True) == []


def test_truncated_test_images_and_label_maps_are_named(dataset: Path) -> None:
    test_image = _truncate(dataset / "imagesTs" / "test_0_0000.nii.gz")
    label = _truncate(dataset / "labelsTr" / "case_2.nii.gz", keep=30)  # not even a header left
    problems = validate_dataset(dataset)
    assert [p.split(": ", 1)[0] for p in problems] == [str(test_image), str(label)]  # sorted by path
    assert problems[1].startswith(f"{label}: cannot read label file (")


def test_nan_and_infinite_voxels_are_counted(dataset: Path) -> None:
    nan_image = dataset / "imagesTr" / "case_0_0000.nii.gz"
    _set_voxels(nan_image, (np.array([0, 1, 2]), 0, 0), np.nan)
    inf_image = dataset / "imagesTr" / "case_2_0000.nii.gz"
    _set_voxels(inf_image, (0, 0, 0), np.inf)
    _set_voxels(inf_image, (7, 7, 7), -np.inf)
    _set_voxels(inf_image, (4, 4, 4), np.nan)
    assert validate_dataset(dataset) == [
        f"{nan_image}: 3 NaN voxel(s) of 512 (expected finite values)",
        f"{inf_image}: 1 NaN and 2 infinite voxel(s) of 512 (expected finite values)",
    ]
    assert validate_dataset(dataset, quick=True) == []


def test_non_integer_and_undeclared_label_values_are_named(dataset: Path) -> None:
    label = dataset / "labelsTr" / "case_0.nii.gz"
    _write(label, np.where(read_volume(label).array > 0, 1.5, 0.0).astype(np.float32))
    other = dataset / "labelsTr" / "case_1.nii.gz"
    _set_voxels(other, (0, 0, 0), 7)
    assert validate_dataset(dataset) == [
        f"{label}: label values must be integers, got [1.5]",
        f"{other}: label values [7] are not declared in dataset.json labels",
    ]


def test_an_empty_volume_is_named(dataset: Path) -> None:
    image = _write(dataset / "imagesTs" / "test_0_0000.nii.gz", np.zeros((0, 8, 8), np.float32))
    expected = f"{image}: empty image, shape (0, 8, 8) (expected at least one voxel along every axis)"
    assert validate_dataset(dataset) == [expected]
    assert validate_dataset(dataset, quick=True) == [expected]  # a header fact, seen by both modes


def test_an_empty_images_folder_is_named(dataset: Path) -> None:
    for path in (dataset / "imagesTr").iterdir():
        path.unlink()
    (dataset / "imagesTr" / ".DS_Store").write_bytes(b"hidden files are not images")
    problems = validate_dataset(dataset)
    assert f"{dataset / 'imagesTr'}: no training images ending in .nii.gz" in problems
    assert "numTraining is 3 but imagesTr holds 0 cases" in "\n".join(problems)


def test_problems_come_in_file_order_whatever_order_the_threads_finish_in(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [_truncate(dataset / "imagesTr" / f"{case}_0000.nii.gz") for case in CASES]
    expected = validate_dataset(dataset)
    assert [p.split(": ", 1)[0] for p in expected] == [str(p) for p in sorted(broken)]

    finished: list[Path] = []
    lock = threading.Lock()

    def first_file_last(path: Path) -> Volume:
        if path == broken[0]:
            time.sleep(0.3)  # the alphabetically first file finishes last
        try:
            return read_volume(path)
        finally:
            with lock:
                finished.append(path)

    monkeypatch.setattr(validation, "read_volume", first_file_last)
    assert validate_dataset(dataset) == expected
    assert finished[-1] == broken[0]


def test_the_validate_command_lists_each_problem_and_exits_2(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    from mednets.cli import main

    assert main(["validate", str(dataset)]) == 0
    assert "valid (every voxel read)" in capsys.readouterr().out
    _truncate(dataset / "imagesTr" / "case_2_0000.nii.gz")
    assert main(["validate", str(dataset), "--quick"]) == 0  # headers only: the truncation is not seen
    capsys.readouterr()
    assert main(["validate", str(dataset)]) == 2  # a user error: the dataset must be fixed
    errors = capsys.readouterr().err
    assert "case_2_0000.nii.gz: cannot read" in errors and "1 problem in dataset folder" in errors
    assert main(["validate", str(dataset / "missing")]) == 2
