"""Dataset folder validation, splits and presence targets (mednets.data.dataset)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mednets.data.dataset import load_dataset, presence_targets, split_cases, validate_dataset
from mednets.data.io import read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import DatasetError


@pytest.fixture
def dataset_copy(phantom_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(phantom_dataset, tmp_path / "ds"))


def test_phantom_dataset_is_valid(phantom_dataset: Path) -> None:
    assert validate_dataset(phantom_dataset) == []
    dataset = load_dataset(phantom_dataset)
    assert [c.case_id for c in dataset.training] == ["phantom_000", "phantom_001", "phantom_002"]
    assert dataset.structures[0] == "spleen" and len(dataset.structures) == 13
    record = dataset.records(["phantom_001"])[0]
    assert record["image"][0].endswith("phantom_001_0000.nii.gz") and len(record["presence"]) == 13


def test_validation_reports_every_problem_at_once(dataset_copy: Path) -> None:
    root = dataset_copy
    (root / "labelsTr" / "phantom_000.nii.gz").unlink()  # missing label file
    (root / "imagesTr" / "phantom_001_0000.nii.gz").rename(
        root / "imagesTr" / "phantom_001_0001.nii.gz"
    )  # wrong channel
    label = read_volume(root / "labelsTr" / "phantom_002.nii.gz")
    label.array[0, 0, 0] = 42  # a value dataset.json does not declare
    write_volume(label, root / "labelsTr" / "phantom_002.nii.gz")
    shifted = read_volume(root / "imagesTr" / "phantom_002_0000.nii.gz")
    shifted.affine[0, 3] += 5.0  # image and label no longer on the same grid
    write_volume(shifted, root / "imagesTr" / "phantom_002_0000.nii.gz")

    problems = validate_dataset(root)
    text = "\n".join(problems)
    assert "labelsTr/phantom_000.nii.gz: missing label file" in text
    assert "phantom_001_0001.nii.gz: wrong channel suffix _0001" in text
    assert "phantom_002.nii.gz: label values [42] are not declared" in text
    assert "phantom_002.nii.gz: affine differs from image phantom_002_0000.nii.gz" in text
    assert "numTraining is 3 but imagesTr holds 2 cases" in text
    with pytest.raises(DatasetError) as caught:
        load_dataset(root)
    assert all(problem in str(caught.value) for problem in problems)


def test_shape_mismatch_and_orphan_label(dataset_copy: Path) -> None:
    root = dataset_copy
    label = read_volume(root / "labelsTr" / "phantom_000.nii.gz")
    write_volume(Volume(label.array[:-1], label.affine), root / "labelsTr" / "phantom_000.nii.gz")
    shutil.copy(root / "labelsTr" / "phantom_001.nii.gz", root / "labelsTr" / "stray.nii.gz")
    text = "\n".join(validate_dataset(root))
    assert (
        "phantom_000.nii.gz: shape (31, 32, 32) differs from image phantom_000_0000.nii.gz shape (32, 32, 32)" in text
    )
    assert "stray.nii.gz: label file without an image" in text


def test_broken_dataset_json(dataset_copy: Path) -> None:
    info_path = dataset_copy / "dataset.json"
    info = json.loads(info_path.read_text())
    info["labels"] = {"background": 0, "liver": "six"}
    del info["channel_names"]
    info_path.write_text(json.dumps(info))
    text = "\n".join(validate_dataset(dataset_copy))
    assert "field 'labels' must map names to non-negative integer ids" in text
    assert "field 'channel_names'" in text
    info_path.write_text("{not json")
    assert "not valid JSON" in validate_dataset(dataset_copy)[0]


def test_presence_min_voxels_and_overrides() -> None:
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, :3, :3] = 1  # 9 voxels of spleen
    labels[1:3] = 2  # 32 voxels of kidney
    ids = {"background": 0, "spleen": 1, "kidney": 2, "liver": 3}
    assert presence_targets(labels, ids, min_voxels=10) == {"spleen": False, "kidney": True, "liver": False}
    assert presence_targets(labels, ids, min_voxels=9)["spleen"] is True
    overridden = presence_targets(labels, ids, min_voxels=10, overrides={"kidney": False, "liver": True})
    assert overridden == {"spleen": False, "kidney": False, "liver": True}


def test_dataset_json_presence_override_is_used(dataset_copy: Path) -> None:
    info_path = dataset_copy / "dataset.json"
    info = json.loads(info_path.read_text())
    info["presence"] = {"phantom_000": {"liver": False}}
    info_path.write_text(json.dumps(info))
    dataset = load_dataset(dataset_copy)
    assert dataset.presence("phantom_000")["liver"] is False
    assert dataset.presence("phantom_001")["liver"] is True


def test_splits_are_deterministic_and_disjoint() -> None:
    ids = [f"case_{i:02d}" for i in range(20)]
    train, val = split_cases(ids, val_fraction=0.25, seed=3)
    assert (train, val) == split_cases(list(reversed(ids)), val_fraction=0.25, seed=3)
    assert len(val) == 5 and not set(train) & set(val) and set(train) | set(val) == set(ids)
    assert split_cases(ids, val_fraction=0.25, seed=4) != (train, val)
