"""DICOM series read and written with their geometry (mednets.data.dicom, through mednets.data.io)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mednets.data import dicom
from mednets.data.io import read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import InvalidInputError


def test_real_jpeg2000_dicom_series_matches_simpleitk(real_ct: Path) -> None:
    folder = real_ct / "example_ct_dicom"
    volume = read_volume(folder)
    assert volume.array.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.array.min() >= -1024 and volume.array.max() > 500  # HU: air to bone
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    lps_origin = np.asarray(image.GetOrigin())
    np.testing.assert_allclose(volume.affine[:3, 3], lps_origin * [-1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(np.abs(np.diag(volume.affine)[:3]), image.GetSpacing(), atol=1e-6)


def test_pydicom_fallback_reads_the_same_series(real_ct: Path) -> None:
    folder = real_ct / "example_ct_dicom"
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    array, affine = dicom._read_dicom_pydicom(files, folder)  # the path taken when GDCM cannot decode
    reference = read_volume(folder)
    np.testing.assert_array_equal(array, reference.array)
    np.testing.assert_allclose(affine, reference.affine, atol=1e-4)


def test_dicom_series_with_a_missing_slice_is_rejected(real_ct: Path, tmp_path: Path) -> None:
    files = sorted((real_ct / "example_ct_dicom").iterdir())
    for path in files[:5] + files[6:10]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.raises(InvalidInputError, match="evenly spaced") as caught:
        read_volume(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_empty_folder_is_not_a_dicom_series(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no DICOM series"):
        read_volume(tmp_path)


def _dicom_headers(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir())]


def test_dicom_series_round_trip_oblique_int16(
    tmp_path: Path, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    volume = make_volume(oblique_affine)
    folder = write_volume(volume, tmp_path / "series")  # no suffix: a DICOM series folder
    back = read_volume(folder)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == np.int16
    # DICOM stores geometry as decimal strings of at most 16 characters: about 1e-12 mm here, so
    # the 1e-6 asked of every format holds with a wide margin.
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # no temporary folder left
    headers = _dicom_headers(folder)
    assert [h.InstanceNumber for h in headers] == [1, 2, 3, 4, 5]
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(h[tag].value) for h in headers}) == 1
    assert len({str(h.SOPInstanceUID) for h in headers}) == 5
    assert {h.Modality for h in headers} == {"CT"}
    assert (float(headers[0].RescaleSlope), float(headers[0].RescaleIntercept)) == (1.0, 0.0)
    # Slice k sits at affine @ [0, 0, k, 1], in LPS.
    for k, header in enumerate(headers):
        ras = (volume.affine @ [0.0, 0.0, k, 1.0])[:3]
        np.testing.assert_allclose([float(v) for v in header.ImagePositionPatient], ras * [-1, -1, 1], atol=1e-9)
    assert [float(v) for v in headers[0].PixelSpacing] == pytest.approx([0.9, 0.8])  # (rows: y, columns: x)


def test_dicom_series_names_the_installed_mednets_version(
    tmp_path: Path, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    folder = dicom.write_dicom_series(make_volume(oblique_affine), tmp_path / "series")
    expected = f"mednets {importlib.metadata.version('mednets')}"
    assert {str(h.SoftwareVersions) for h in _dicom_headers(folder)} == {expected}


def test_dicom_float_volume_is_quantised_within_half_a_slope(tmp_path: Path, oblique_affine: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    volume = Volume(rng.normal(0.0, 300.0, size=(4, 6, 7)).astype(np.float32), oblique_affine)
    back = read_volume(write_volume(volume, tmp_path / "float_series"))
    slope = float(_dicom_headers(tmp_path / "float_series")[0].RescaleSlope)
    assert slope == pytest.approx(float(volume.array.max() - volume.array.min()) / 65535, rel=1e-9)
    # The documented rule: int16 over the value range, so the error is at most half a step.
    assert np.abs(back.array - volume.array.astype(np.float64)).max() <= slope / 2 * (1 + 1e-9)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)


def test_dicom_left_handed_affine_comes_back_with_the_slice_axis_reversed(
    tmp_path: Path, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    affine = oblique_affine.copy()
    affine[:3, 2] *= -1  # slices step against the row x column normal: DICOM readers re-sort them
    volume = make_volume(affine)
    back = read_volume(write_volume(volume, tmp_path / "series"))
    flipped = affine.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = (affine @ [0.0, 0.0, volume.array.shape[0] - 1, 1.0])[:3]
    np.testing.assert_array_equal(back.array, volume.array[::-1])
    np.testing.assert_allclose(back.affine, flipped, atol=1e-6)


def test_real_dicom_series_written_and_read_again_is_unchanged(real_ct: Path, tmp_path: Path) -> None:
    original = read_volume(real_ct / "example_ct_dicom")
    back = read_volume(write_volume(original, tmp_path / "ct_series"))
    np.testing.assert_array_equal(back.array, original.array)
    assert back.array.dtype == original.array.dtype == np.int16
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-6)
    assert back.spacing == pytest.approx(original.spacing)
    assert back.meta["files"] == original.meta["files"] == 20


def test_dicom_write_refuses_a_folder_of_other_files_and_leaves_it_untouched(
    tmp_path: Path, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    folder = tmp_path / "patient"
    folder.mkdir()
    (folder / "notes.txt").write_text("not mine to delete")
    (folder / "slice_00000.dcm").write_bytes(b"looks like ours by name only")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(InvalidInputError, match="not a mednets DICOM series") as caught:
        write_volume(make_volume(oblique_affine), folder)
    assert str(folder) in str(caught.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patient"]


def test_dicom_rewrite_replaces_an_old_series_and_a_failed_one_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    folder = tmp_path / "series"
    write_volume(make_volume(oblique_affine), folder)
    smaller = Volume(make_volume(np.eye(4)).array[:3], np.eye(4))
    write_volume(smaller, folder)  # a series written before is replaced, not merged
    assert len(list(folder.iterdir())) == 3
    np.testing.assert_array_equal(read_volume(folder).array, smaller.array)

    calls = []

    def broken_execute(self, *args):  # the second slice fails like a full disk would
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original_execute(self, *args)

    original_execute = sitk.ImageFileWriter.Execute
    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", broken_execute)
    with pytest.raises(RuntimeError, match="disk full"):
        write_volume(make_volume(oblique_affine), folder)
    np.testing.assert_array_equal(read_volume(folder).array, smaller.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_dicom_write_into_an_empty_folder_works_and_onto_a_file_is_refused(
    tmp_path: Path, oblique_affine: np.ndarray, make_volume: Callable[..., Volume]
) -> None:
    empty = tmp_path / "empty.series"  # an existing folder is a DICOM target whatever its name
    empty.mkdir()
    write_volume(make_volume(oblique_affine), empty)
    assert len(list(empty.iterdir())) == 5
    plain = tmp_path / "case"
    plain.write_text("a file without suffix")
    with pytest.raises(InvalidInputError, match="not a folder") as caught:
        write_volume(make_volume(oblique_affine), plain)
    assert str(plain) in str(caught.value)
    assert plain.read_text() == "a file without suffix"
