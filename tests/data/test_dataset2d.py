"""2D dataset folders: validation errors naming the file, writers, intensity normalisation, training samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mednets.data.dataset2d import (
    load_dataset_2d,
    normalise_2d,
    read_case_2d,
    split_image_pair,
    validate_dataset_2d,
    write_dataset_2d,
    write_phantom_slice_datasets,
)
from mednets.data.loaders2d import augmentation_axes_2d, segmentation_datasets_2d
from mednets.errors import DatasetError


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
    return write_dataset_2d(tmp_path / "ds", _cases(), {"background": 0, "cell": 1}, channel_name="microscopy")


def test_written_dataset_validates_and_loads(dataset_2d: Path) -> None:
    assert validate_dataset_2d(dataset_2d) == []
    dataset = load_dataset_2d(dataset_2d)
    assert [c.case_id for c in dataset.training] == ["case_0", "case_1", "case_2"]
    image, label = read_case_2d(dataset, dataset.training[0], (-200, 300))
    assert image.shape == (1, 40, 48) and image.dtype == np.float32 and label.shape == (40, 48)


def test_colour_png_dataset_validates(tmp_path: Path) -> None:
    root = write_dataset_2d(tmp_path / "rgb", _cases(colour=True), {"background": 0, "cell": 1}, channel_name="RGB",
                            file_ending=".png")  # fmt: skip
    dataset = load_dataset_2d(root)
    image, _ = read_case_2d(dataset, dataset.training[0], (-200, 300))
    assert image.shape == (3, 40, 48)


def test_a_3d_file_ending_is_rejected(dataset_2d: Path) -> None:
    info = json.loads((dataset_2d / "dataset.json").read_text())
    info["file_ending"] = ".nii.gz"
    (dataset_2d / "dataset.json").write_text(json.dumps(info))
    problems = validate_dataset_2d(dataset_2d)
    assert any("field 'file_ending' must be one of .png, .tif, .tiff" in p for p in problems)


def test_validation_names_every_broken_file(dataset_2d: Path) -> None:
    tifffile.imwrite(dataset_2d / "imagesTr" / "case_0_0000.tif", np.zeros((2, 40, 48), np.uint8))  # two pages
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_1.tif", np.zeros((40, 48), np.float32))  # float labels
    tifffile.imwrite(dataset_2d / "imagesTr" / "case_2_0000.tif", np.zeros((40, 48, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(dataset_2d / "labelsTr" / "stray.tif", np.zeros((40, 48), np.uint8))
    with pytest.raises(DatasetError) as raised:
        load_dataset_2d(dataset_2d)
    message = str(raised.value)
    assert "case_0_0000.tif: holds 2 pages; a 2D dataset holds one page per file" in message
    assert "case_1.tif: a label map must hold integers, got float32" in message
    assert "case_2_0000.tif: 3 colour channel(s), other files of channel 0000 have 1" in message
    assert "stray.tif: label file without an image" in message


def test_label_size_mismatch_and_colour_labels_are_reported(dataset_2d: Path) -> None:
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_0.tif", np.zeros((40, 47), np.uint8))
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_1.tif", np.zeros((40, 48, 3), np.uint8), photometric="rgb")
    problems = validate_dataset_2d(dataset_2d)
    assert any("case_0.tif: shape (40, 47) differs from image case_0_0000.tif shape (40, 48)" in p for p in problems)
    assert any("case_1.tif: a label map must be one single-channel 2D image" in p for p in problems)


def test_undeclared_label_values_are_reported(dataset_2d: Path) -> None:
    tifffile.imwrite(dataset_2d / "labelsTr" / "case_2.tif", np.full((40, 48), 7, np.uint8))
    assert any("case_2.tif: label values [7] are not declared" in p for p in validate_dataset_2d(dataset_2d))


def test_normalisation_windows_ct_scales_uint8_and_stretches_the_rest() -> None:
    ct = np.array([[-1000, -200, 50, 300, 2000]], dtype=np.int16)
    np.testing.assert_allclose(normalise_2d(ct, "CT", (-200, 300))[0, 0], [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalise_2d(np.array([[0, 255]], np.uint8), "x", (0, 1))[0, 0], [0, 1])
    fluorescence = np.arange(1000, dtype=np.uint16).reshape(20, 50)
    out = normalise_2d(fluorescence, "fluorescence", (0, 1))
    assert out.min() == 0.0 and out.max() == 1.0 and 0.45 < out.mean() < 0.55


def test_image_pair_splits_into_left_training_and_right_test_halves(shared_dir: Path, tmp_path: Path) -> None:
    folder = shared_dir / "data" / "nuclei2d"
    train, test = split_image_pair(
        folder / "img2d.tif", folder / "mask2d.tif", tmp_path / "nuclei", structure="nucleus"
    )
    left, right = load_dataset_2d(train), load_dataset_2d(test)
    assert left.labels == {"background": 0, "nucleus": 1}
    mask = tifffile.imread(folder / "mask2d.tif")
    _, left_label = read_case_2d(left, left.training[0], (0, 1))
    _, right_label = read_case_2d(right, right.training[0], (0, 1))
    np.testing.assert_array_equal(np.concatenate([left_label, right_label], 1), mask > 0)


def test_phantom_slices_hold_the_14_classes(tmp_path: Path) -> None:
    train, test = write_phantom_slice_datasets(tmp_path, n_train=2, n_test=1, shape=(16, 48, 48), slices_per_case=4)
    dataset = load_dataset_2d(train)
    assert len(dataset.labels) == 14 and dataset.info["channel_names"] == {"0": "CT"}
    assert len(dataset.training) == 8 and len(load_dataset_2d(test).training) == 4
    image = tifffile.imread(dataset.training[0].images[0])
    assert image.dtype == np.int16 and image.shape == (48, 48)


def test_single_image_trains_on_top_rows_and_validates_on_the_bottom(tmp_path: Path) -> None:
    image = np.arange(128 * 64, dtype=np.uint16).reshape(128, 64)
    label = (image % 7 == 0).astype(np.uint8)
    root = write_dataset_2d(tmp_path / "one", [("big", image, label)], {"background": 0, "dot": 1}, channel_name="x")
    train, val = segmentation_datasets_2d(load_dataset_2d(root), patch_size=(32, 32), hu_window=(0, 1),
                                          val_fraction=0.25, split_seed=0, augment=True, seed=0)  # fmt: skip
    assert train.images[0].shape == (1, 96, 64) and len(val) == 1 and tuple(val[0]["label"].shape) == (32, 64)
    sample = train[0]
    assert tuple(sample["image"].shape) == (1, 32, 32) and tuple(sample["label"].shape) == (32, 32)
    assert augmentation_axes_2d(["dot"]) == ([0, 1], True)  # cells have no orientation
    assert augmentation_axes_2d(["liver", "left_kidney", "right_kidney"]) == ([], False)  # anatomy does
