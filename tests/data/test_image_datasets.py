"""Dataset folders of 2D images: validation errors naming the file, writers, intensity normalisation, samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mednets.config import PhantomConfig
from mednets.data.convert import ensure_phantom_datasets, split_image_pair, write_image_dataset
from mednets.data.dataset import Dataset, load_dataset, validate_dataset
from mednets.data.fingerprint import extract_fingerprint, read_case_arrays
from mednets.data.intensity import ChannelNormalisation
from mednets.data.preprocessing import PreprocessingPlan, preprocess_dataset
from mednets.data.samples import segmentation_datasets
from mednets.data.transforms import augmentation_axes
from mednets.errors import DatasetError


def _read_case(dataset: Dataset, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A case's channels [C, H, W] and label map [H, W], as preprocessing reads them."""
    channels, labels, _ = read_case_arrays(dataset.case(case_id))
    return np.stack(channels), np.asarray(labels).astype(np.int64)


def _cases(n: int = 3, colour: bool = False) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        image = rng.integers(0, 255, (40, 48, 3) if colour else (40, 48), dtype=np.uint8)
        label = np.zeros((40, 48), np.uint8)
        label[10:20, 12:30] = 1
        cases.append((f"case_{i}", image, label))
    return cases


@pytest.fixture
def dataset_2d(tmp_path: Path) -> Path:
    return write_image_dataset(tmp_path / "ds", _cases(), {"background": 0, "cell": 1}, channel_name="microscopy")


def test_written_dataset_validates_and_loads(dataset_2d: Path) -> None:
    assert validate_dataset(dataset_2d) == []
    dataset = load_dataset(dataset_2d)
    assert [c.case_id for c in dataset.training] == ["case_0", "case_1", "case_2"]
    image, label = _read_case(dataset, "case_0")
    assert image.shape == (1, 40, 48) and label.shape == (40, 48)


def test_colour_png_dataset_validates(tmp_path: Path) -> None:
    root = write_image_dataset(tmp_path / "rgb", _cases(colour=True), {"background": 0, "cell": 1}, channel_name="RGB",
                            file_ending=".png")  # fmt: skip
    dataset = load_dataset(root)
    image, _ = _read_case(dataset, "case_0")
    assert image.shape == (3, 40, 48)


def test_files_of_another_ending_are_reported(dataset_2d: Path) -> None:
    info = json.loads((dataset_2d / "dataset.json").read_text())
    info["file_ending"] = ".nii.gz"
    (dataset_2d / "dataset.json").write_text(json.dumps(info))
    problems = validate_dataset(dataset_2d)
    assert any("case_0_0000.tif: unexpected file (images end in .nii.gz)" in p for p in problems)


def test_validation_names_every_broken_file(dataset_2d: Path) -> None:
    tifffile.imwrite(dataset_2d / "imagesTr" / "case_0_0000.tif", np.zeros((2, 40, 48), np.uint8))  # two pages
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_1.tif", np.zeros((40, 48), np.float32))  # float labels
    tifffile.imwrite(dataset_2d / "imagesTr" / "case_2_0000.tif", np.zeros((40, 48, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(dataset_2d / "labelsTr" / "stray.tif", np.zeros((40, 48), np.uint8))
    with pytest.raises(DatasetError) as raised:
        load_dataset(dataset_2d)
    message = str(raised.value)
    assert "case_0_0000.tif: holds 2 pages; a 2D dataset holds one page per file" in message
    assert "case_1.tif: a label map must hold integers, got float32" in message
    assert "case_2_0000.tif: 3 colour channel(s), other files of channel 0000 have 1" in message
    assert "stray.tif: label file without an image" in message


def test_label_size_mismatch_and_colour_labels_are_reported(dataset_2d: Path) -> None:
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_0.tif", np.zeros((40, 47), np.uint8))
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_1.tif", np.zeros((40, 48, 3), np.uint8), photometric="rgb")
    problems = validate_dataset(dataset_2d)
    assert any("case_0.tif: shape (40, 47) differs from image case_0_0000.tif shape (40, 48)" in p for p in problems)
    assert any("case_1.tif: a label map must be one single-channel 2D image" in p for p in problems)


def test_undeclared_label_values_are_reported(dataset_2d: Path) -> None:
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_2.tif", np.full((40, 48), 7, np.uint8))
    assert any("case_2.tif: label values [7] are not declared" in p for p in validate_dataset(dataset_2d))


def test_image_pair_splits_into_left_training_and_right_test_halves(shared_dir: Path, tmp_path: Path) -> None:
    folder = shared_dir / "data" / "nuclei2d"
    train, test = split_image_pair(
        folder / "img2d.tif", folder / "mask2d.tif", tmp_path / "nuclei", structure="nucleus"
    )
    left, right = load_dataset(train), load_dataset(test)
    assert left.labels == {"background": 0, "nucleus": 1}
    mask = tifffile.imread(folder / "mask2d.tif")
    _, left_label = _read_case(left, left.training[0].case_id)
    _, right_label = _read_case(right, right.training[0].case_id)
    np.testing.assert_array_equal(np.concatenate([left_label, right_label], 1), mask > 0)


def test_phantom_slices_hold_the_14_classes(tmp_path: Path) -> None:
    phantoms = PhantomConfig(n_train=2, n_test=1, shape=(16, 48, 48))
    train, test = ensure_phantom_datasets(tmp_path, phantoms, spatial_dims=2)
    dataset = load_dataset(train)
    assert len(dataset.labels) == 14 and dataset.info["channel_names"] == {"0": "CT"} and dataset.spatial_dims == 2
    assert len(dataset.training) > len(load_dataset(test).training) >= 2
    image = tifffile.imread(dataset.training[0].images[0])
    assert image.dtype == np.int16 and image.shape == (48, 48)


def test_single_image_trains_on_top_rows_and_validates_on_the_bottom(tmp_path: Path) -> None:
    image = np.arange(128 * 64, dtype=np.uint16).reshape(128, 64)
    label = (image % 7 == 0).astype(np.uint8)
    root = write_image_dataset(tmp_path / "one", [("big", image, label)], {"background": 0, "dot": 1}, channel_name="x")
    dataset = load_dataset(root)
    plan = PreprocessingPlan(2, None, None, (ChannelNormalisation("zscore"),))
    fingerprint = extract_fingerprint(dataset, workers=1, progress=False)
    cache, _ = preprocess_dataset(dataset, fingerprint, plan, tmp_path / "cache", workers=1, progress=False)
    train, val = segmentation_datasets(dataset, cache, plan, cases=["big"], grid=None, patch_size=(32, 32),
                                       val_fraction=0.25, split_seed=0, augment=True, seed=0)  # fmt: skip
    assert train.rows == {"big": (0, 96)} and len(val) == 1 and tuple(val[0]["label"].shape) == (32, 64)
    np.testing.assert_array_equal(val[0]["label"].numpy(), label[96:])
    assert len(train) == 64  # one image fills an epoch of samples
    sample = train[0]
    assert tuple(sample["image"].shape) == (1, 32, 32) and tuple(sample["label"].shape) == (32, 32)
    assert augmentation_axes(["dot"], 2) == ([0, 1], True)  # cells have no orientation
    assert augmentation_axes(["liver", "left_kidney", "right_kidney"], 2) == ([], False)  # anatomy does
