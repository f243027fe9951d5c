"""NIfTI and NRRD/MHA/MHD volumes with their geometry (mednets.data.nifti_itk, through mednets.data.io)."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mednets.data.io import read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import InvalidInputError


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_round_trip_voxels_and_oblique_affine(
    tmp_path: Path, suffix: str, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    volume = make_volume(oblique_affine)
    path = write_volume(volume, tmp_path / f"case{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == (["case.mhd", "case.raw"] if suffix == ".mhd" else [f"case{suffix}"])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path: Path, suffix: str, make_volume: Callable[..., Volume]) -> None:
    # NIfTI stores the affine as float32: use float32-exact numbers to check for 1e-6 agreement.
    affine = np.array([[0.0, -0.75, 0.0, 120.5], [0.0, 0.0, 2.5, -40.25], [-1.5, 0.0, 0.0, 17.0], [0, 0, 0, 1]])
    volume = make_volume(affine, np.float32)
    back = read_volume(write_volume(volume, tmp_path / f"case{suffix}"))
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    assert back.spacing == pytest.approx((2.5, 0.75, 1.5))  # (D, H, W) = norms of columns k, j, i


def test_ras_affine_matches_simpleitk_physical_points(
    tmp_path: Path, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    volume = make_volume(oblique_affine)
    path = write_volume(volume, tmp_path / "case.nrrd")
    image = sitk.ReadImage(str(path))
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:  # (x, y, z) = (w, h, d)
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = (volume.affine @ [*index, 1.0])[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-6)
        # array[d, h, w] holds the voxel at index (w, h, d)
        assert volume.array[index[2], index[1], index[0]] == image[index]


def test_real_nifti_geometry(real_ct: Path) -> None:
    path = real_ct / "example_ct_sm.nii.gz"
    volume = read_volume(path)
    reference = nib.load(str(path))
    assert volume.array.shape == reference.shape[::-1] == (30, 101, 122)
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert volume.orientation == "RAS"
    assert volume.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[4, 50, 60], np.asarray(reference.dataobj)[60, 50, 4])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_truncated_file_is_rejected_naming_it(tmp_path: Path, suffix: str, make_volume: Callable[..., Volume]) -> None:
    good = write_volume(make_volume(np.eye(4)), tmp_path / f"good{suffix}")
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError) as caught:
        read_volume(truncated)
    assert str(truncated) in str(caught.value)


def test_nifti_with_header_larger_than_data_is_rejected(tmp_path: Path, make_volume: Callable[..., Volume]) -> None:
    good = write_volume(make_volume(np.eye(4)), tmp_path / "good.nii")
    raw = bytearray(good.read_bytes())
    raw[42:44] = np.int16(60).tobytes()  # dim[1] = 60 voxels, far more than the file holds
    bad = tmp_path / "inconsistent.nii.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(InvalidInputError, match=r"inconsistent\.nii\.gz"):
        read_volume(bad)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_volume: Callable[..., Volume]
) -> None:
    target = tmp_path / "case.nii.gz"
    write_volume(make_volume(np.eye(4)), target)
    before = target.read_bytes()

    def broken_save(image, filename):  # writes half a file, then fails like a full disk would
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_volume(make_volume(np.eye(4)), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]


def test_writing_a_2d_array_as_volume_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="3D"):
        write_volume(Volume(np.zeros((4, 4))), tmp_path / "flat.nii.gz")
    assert list(tmp_path.iterdir()) == []
