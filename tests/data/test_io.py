"""Reading and writing volumes and images with their geometry (mednets.data.io)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mednets.data import io
from mednets.data.io import Volume, read_volume, write_volume
from mednets.errors import InvalidInputError


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-101.3, 47.77, -12.125]
    return affine


def _volume(affine: np.ndarray, dtype=np.int16) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-1000, 1500, size=(5, 6, 7)).astype(dtype), affine)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_round_trip_voxels_and_oblique_affine(tmp_path: Path, suffix: str) -> None:
    volume = _volume(_oblique_affine())
    path = write_volume(volume, tmp_path / f"case{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == (["case.mhd", "case.raw"] if suffix == ".mhd" else [f"case{suffix}"])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path: Path, suffix: str) -> None:
    # NIfTI stores the affine as float32: use float32-exact numbers to check for 1e-6 agreement.
    affine = np.array([[0.0, -0.75, 0.0, 120.5], [0.0, 0.0, 2.5, -40.25], [-1.5, 0.0, 0.0, 17.0], [0, 0, 0, 1]])
    volume = _volume(affine, np.float32)
    back = read_volume(write_volume(volume, tmp_path / f"case{suffix}"))
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    assert back.spacing == pytest.approx((2.5, 0.75, 1.5))  # (D, H, W) = norms of columns k, j, i


def test_ras_affine_matches_simpleitk_physical_points(tmp_path: Path) -> None:
    volume = _volume(_oblique_affine())
    path = write_volume(volume, tmp_path / "case.nrrd")
    image = sitk.ReadImage(str(path))
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:  # (x, y, z) = (w, h, d)
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = (volume.affine @ [*index, 1.0])[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-6)
        # array[d, h, w] holds the voxel at index (w, h, d)
        assert volume.array[index[2], index[1], index[0]] == image[index]


def test_reoriented_keeps_world_positions() -> None:
    volume = _volume(_oblique_affine())
    lps = volume.reoriented("LPS")
    assert lps.orientation == "LPS"
    # Find a voxel by value and compare its world position before and after.
    d, h, w = 2, 3, 4
    value = volume.array[d, h, w]
    matches = np.argwhere(lps.array == value)
    worlds = [lps.affine @ [m[2], m[1], m[0], 1.0] for m in matches]
    target = volume.affine @ [w, h, d, 1.0]
    assert min(np.abs(world - target).max() for world in worlds) < 1e-6


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
    array, affine = io._read_dicom_pydicom(files, folder)  # the path taken when GDCM cannot decode
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


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd", ".png", ".tif"])
def test_corrupt_file_is_rejected_naming_it(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InvalidInputError) as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_truncated_file_is_rejected_naming_it(tmp_path: Path, suffix: str) -> None:
    good = write_volume(_volume(np.eye(4)), tmp_path / f"good{suffix}")
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError) as caught:
        read_volume(truncated)
    assert str(truncated) in str(caught.value)


def test_nifti_with_header_larger_than_data_is_rejected(tmp_path: Path) -> None:
    good = write_volume(_volume(np.eye(4)), tmp_path / "good.nii")
    raw = bytearray(good.read_bytes())
    raw[42:44] = np.int16(60).tobytes()  # dim[1] = 60 voxels, far more than the file holds
    bad = tmp_path / "inconsistent.nii.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(InvalidInputError, match=r"inconsistent\.nii\.gz"):
        read_volume(bad)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(InvalidInputError, match="unknown file type"):
        read_volume(other)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "case.nii.gz"
    write_volume(_volume(np.eye(4)), target)
    before = target.read_bytes()

    def broken_save(image, filename):  # writes half a file, then fails like a full disk would
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_volume(_volume(np.eye(4)), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]


def test_writing_a_2d_array_as_volume_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="3D"):
        write_volume(Volume(np.zeros((4, 4))), tmp_path / "flat.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_png_rgb_and_grey_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    back = read_volume(write_volume(Volume(rgb, channel_axis=-1), tmp_path / "tile.png"))
    np.testing.assert_array_equal(back.array, rgb)
    assert back.channel_axis == -1 and back.spatial_shape == (9, 11)
    grey = rng.integers(0, 65535, size=(9, 11), dtype=np.uint16)
    back = read_volume(write_volume(Volume(grey), tmp_path / "grey.png"))
    np.testing.assert_array_equal(back.array, grey)


def test_jpeg_round_trip_is_close(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    rgb = np.stack([smooth, smooth.T, 255 - smooth], axis=-1)
    back = read_volume(write_volume(Volume(rgb, channel_axis=-1), tmp_path / "tile.jpg"))
    assert back.array.shape == rgb.shape
    assert np.abs(back.array.astype(int) - rgb).mean() < 4


def test_multipage_tiff_and_svs_level0(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(2)
    stack = rng.integers(0, 4000, size=(4, 16, 12), dtype=np.uint16)
    back = read_volume(write_volume(Volume(stack), tmp_path / "stack.tif"))
    np.testing.assert_array_equal(back.array, stack)
    slide = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "slide.svs") as tif:  # a two-level pyramid, like a whole-slide image
        tif.write(slide, photometric="rgb", subifds=1, tile=(16, 16))
        tif.write(slide[::2, ::2], photometric="rgb", subfiletype=1, tile=(16, 16))
    level0 = read_volume(tmp_path / "slide.svs")
    np.testing.assert_array_equal(level0.array, slide)
    assert level0.channel_axis == -1


def test_real_histology_tile_and_nuclei_tiff(shared_dir: Path) -> None:
    tile = read_volume(shared_dir / "data" / "histology" / "high-nuclei-score-level2.png")
    assert tile.array.shape == (512, 512, 4) and tile.channel_axis == -1
    nuclei = read_volume(shared_dir / "data" / "nuclei2d" / "img2d.tif")
    assert nuclei.array.shape == (512, 512) and nuclei.array.dtype == np.uint16


def _dicom_headers(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir())]


def test_dicom_series_round_trip_oblique_int16(tmp_path: Path) -> None:
    volume = _volume(_oblique_affine())
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


def test_dicom_float_volume_is_quantised_within_half_a_slope(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    volume = Volume(rng.normal(0.0, 300.0, size=(4, 6, 7)).astype(np.float32), _oblique_affine())
    back = read_volume(write_volume(volume, tmp_path / "float_series"))
    slope = float(_dicom_headers(tmp_path / "float_series")[0].RescaleSlope)
    assert slope == pytest.approx(float(volume.array.max() - volume.array.min()) / 65535, rel=1e-9)
    # The documented rule: int16 over the value range, so the error is at most half a step.
    assert np.abs(back.array - volume.array.astype(np.float64)).max() <= slope / 2 * (1 + 1e-9)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)


def test_dicom_left_handed_affine_comes_back_with_the_slice_axis_reversed(tmp_path: Path) -> None:
    affine = _oblique_affine()
    affine[:3, 2] *= -1  # slices step against the row x column normal: DICOM readers re-sort them
    volume = _volume(affine)
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


def test_dicom_write_refuses_a_folder_of_other_files_and_leaves_it_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "patient"
    folder.mkdir()
    (folder / "notes.txt").write_text("not mine to delete")
    (folder / "slice_00000.dcm").write_bytes(b"looks like ours by name only")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(InvalidInputError, match="not a mednets DICOM series") as caught:
        write_volume(_volume(_oblique_affine()), folder)
    assert str(folder) in str(caught.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patient"]


def test_dicom_rewrite_replaces_an_old_series_and_a_failed_one_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "series"
    write_volume(_volume(_oblique_affine()), folder)
    smaller = Volume(_volume(np.eye(4)).array[:3], np.eye(4))
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
        write_volume(_volume(_oblique_affine()), folder)
    np.testing.assert_array_equal(read_volume(folder).array, smaller.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_dicom_write_into_an_empty_folder_works_and_onto_a_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.series"  # an existing folder is a DICOM target whatever its name
    empty.mkdir()
    write_volume(_volume(_oblique_affine()), empty)
    assert len(list(empty.iterdir())) == 5
    plain = tmp_path / "case"
    plain.write_text("a file without suffix")
    with pytest.raises(InvalidInputError, match="not a folder") as caught:
        write_volume(_volume(_oblique_affine()), plain)
    assert str(plain) in str(caught.value)
    assert plain.read_text() == "a file without suffix"
