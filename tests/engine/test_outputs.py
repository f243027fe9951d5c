"""Outputs a radiologist and a script can use: named segmentations, DICOM-SEG, masks, statistics, the Python API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import mednets
from mednets.anatomy import describe_structures
from mednets.cli import main
from mednets.data.dicom_seg import read_dicom_seg
from mednets.data.io import list_cases, read_volume, write_volume
from mednets.data.segmentation_files import read_seg_nrrd
from mednets.data.volume import Volume
from mednets.engine.api import load_run
from mednets.engine.statistics import structure_statistics
from mednets.errors import InvalidInputError


@pytest.fixture(scope="module")
def run(tiny_sadaan_run: Path):
    return load_run(tiny_sadaan_run, device="cpu")


@pytest.fixture(scope="module")
def phantom(tiny_sadaan_run: Path) -> Path:
    return sorted((tiny_sadaan_run / "phantoms" / "test" / "imagesTr").glob("*.nii.gz"))[0]


@pytest.fixture(scope="module")
def dicom_series(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom as a DICOM CT series (a project-made series; its own study)."""
    return write_volume(read_volume(phantom), tmp_path_factory.mktemp("dicom") / "series")


def _paint_everything(run, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the tiny run's model judge every structure present, so every segment has voxels."""
    monkeypatch.setattr(run.model, "presence_threshold", 0.0)


def test_seg_nrrd_reads_back_with_names_colours_terminology_and_geometry(run, phantom: Path, tmp_path: Path) -> None:
    code = main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--out", str(tmp_path),
                 "--format", "seg-nrrd", "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0
    labels, segments = read_seg_nrrd(tmp_path / "phantom_000.seg.nrrd")
    source = read_volume(phantom)
    assert labels.array.shape == source.array.shape
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-6)
    expected = describe_structures(run.structures)
    assert [s["name"] for s in segments] == [s.display for s in expected]
    assert [s["label"] for s in segments] == [s.label for s in expected]
    np.testing.assert_allclose([s["color"] for s in segments], [s.color for s in expected], atol=1e-6)
    kidney = next(s for s in segments if s["name"] == "Right kidney")
    assert "SCT^64033007^Kidney~SCT^24028007^Right" in kidney["terminology"]
    # the same label map as the default NIfTI output, and a colour table beside it
    main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--out", str(tmp_path / "nifti"),
          "--device", "cpu", "--quiet"])  # fmt: skip
    np.testing.assert_array_equal(read_volume(tmp_path / "nifti" / "phantom_000.nii.gz").array, labels.array)
    table = (tmp_path / "nifti" / "phantom_000.ctbl").read_text().splitlines()
    assert "2 right_kidney 242 191 51 255" in table and table[1] == "0 background 0 0 0 0"


def test_split_masks_statistics_and_roi_subset(run, phantom: Path, tmp_path: Path, monkeypatch) -> None:
    _paint_everything(run, monkeypatch)
    case = mednets.predict(phantom, run=run, out=tmp_path, split_masks=True, roi_subset=["liver", "spleen"])
    labels = read_volume(tmp_path / "phantom_000.nii.gz").array
    assert set(np.unique(labels)) <= {0, run.structures["liver"], run.structures["spleen"]}
    assert sorted(p.name for p in (tmp_path / "phantom_000").iterdir()) == ["liver.nii.gz", "spleen.nii.gz"]
    for name in ("liver", "spleen"):
        mask = read_volume(tmp_path / "phantom_000" / f"{name}.nii.gz")
        np.testing.assert_array_equal(mask.array, (labels == run.structures[name]).astype(np.uint8))
    assert set(case.structures) == set(case.statistics) == {"liver", "spleen"}
    written = json.loads((tmp_path / "phantom_000.statistics.json").read_text())
    csv_rows = (tmp_path / "phantom_000.statistics.csv").read_text().splitlines()
    assert written == json.loads(json.dumps(case.statistics)) and len(csv_rows) == 3
    assert csv_rows[0].startswith("structure,label,present,presence_probability,voxels,volume_ml")


def test_statistics_equal_numpy_on_the_label_map() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(40, 200, size=(12, 14, 16))
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[2:6, 3:9, 4:10] = 1
    labels[7:11, 1:4, 12:15] = 3
    structures = {"spleen": 1, "liver": 2, "aorta": 3}
    spacing = (2.5, 0.8, 0.7)
    presence = {"spleen": {"present": True, "probability": 0.9}, "liver": {"present": False, "probability": 0.1}}
    table = structure_statistics(labels, image, structures, spacing, presence)
    for name, label in structures.items():
        inside = image[labels == label]
        row = table[name]
        assert row["voxels"] == inside.size
        assert row["volume_ml"] == pytest.approx(inside.size * np.prod(spacing) / 1000)
        if inside.size == 0:
            assert row["intensity_mean"] is None and row["bbox_start"] is None
            continue
        assert row["intensity_mean"] == pytest.approx(inside.mean(), rel=1e-12)
        assert row["intensity_median"] == pytest.approx(np.median(inside), rel=1e-12)
        assert row["intensity_std"] == pytest.approx(inside.std(), rel=1e-9)
        assert (row["intensity_min"], row["intensity_max"]) == (inside.min(), inside.max())
        where = np.argwhere(labels == label)
        assert row["bbox_start"] == where.min(0).tolist() and row["bbox_stop"] == where.max(0).tolist()
    assert table["spleen"]["presence_probability"] == 0.9 and table["liver"]["present"] is False
    assert table["aorta"]["present"] is None  # no presence entry given


def test_the_api_on_a_path_a_simpleitk_image_and_an_array_equals_the_cli(run, phantom: Path, tmp_path: Path) -> None:
    assert main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--out", str(tmp_path),
                 "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    cli = read_volume(tmp_path / "phantom_000.nii.gz")
    source = read_volume(phantom)
    from_path = mednets.predict(phantom, run=run)
    from_sitk = mednets.predict(sitk.ReadImage(str(phantom)), run=run)
    from_nibabel = mednets.predict(nib.load(str(phantom)), run=run)
    from_array = mednets.predict(source.array, run=run, affine=source.affine)
    assert from_path.files == []  # nothing written without `out`
    for case in (from_path, from_sitk, from_nibabel, from_array):
        np.testing.assert_array_equal(case.labels.array, cli.array)
        np.testing.assert_allclose(case.labels.affine, cli.affine, atol=1e-4)
    sidecar = json.loads((tmp_path / "phantom_000.json").read_text())["structures"]
    assert {k: v["present"] for k, v in sidecar.items()} == {k: v["present"] for k, v in from_path.structures.items()}
    # spacing only (no affine): a diagonal geometry, the array in [z, y, x] order with spacing (z, y, x)
    diagonal = mednets.predict(source.array, run=run, spacing=source.spacing)
    assert diagonal.labels.spacing == pytest.approx(source.spacing)
    back = diagonal.to_simpleitk()
    assert back.GetSpacing() == pytest.approx(source.spacing[::-1])
    assert np.asarray(diagonal.to_nibabel().dataobj).shape == source.array.shape[::-1]


def test_an_array_without_geometry_is_an_error(run) -> None:
    with pytest.raises(InvalidInputError, match="no geometry"):
        mednets.predict(np.zeros((16, 16, 16), dtype=np.float32), run=run)
    with pytest.raises(InvalidInputError, match="one positive voxel size per axis"):
        mednets.predict(np.zeros((16, 16, 16), dtype=np.float32), run=run, spacing=(1.0, 1.0))


def test_dicom_seg_references_the_source_series_and_reads_back(run, dicom_series: Path, tmp_path: Path,
                                                               monkeypatch) -> None:  # fmt: skip
    _paint_everything(run, monkeypatch)
    result = mednets.predict(dicom_series, run=run, out=tmp_path, output_format="dicom-seg")
    seg, numbers = read_dicom_seg(tmp_path / "series.seg.dcm")
    source = pydicom.dcmread(next(dicom_series.iterdir()), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.PatientID == source.PatientID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    painted = [name for name, entry in result.structures.items() if entry["voxels"] > 0]
    assert len(numbers) == len(painted)
    codes = {s.display: s.snomed[0] for s in describe_structures(run.structures)}
    assert all(item.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes[item.SegmentLabel]
               for item in seg.SegmentSequence)  # fmt: skip
    # the segments' voxels are the label map's (highdicom puts the volume back on the source grid)
    mask = np.asarray(seg.get_volume(combine_segments=True, relabel=True).array)
    labels = result.labels.array
    for name in painted:
        assert int((mask == numbers[describe_name(name)]).sum()) == int((labels == run.structures[name]).sum())


def describe_name(name: str) -> str:
    return next(s.display for s in describe_structures({name: 1}))


def test_dicom_seg_names_paired_organs_by_code_and_laterality(dicom_series: Path, tmp_path: Path) -> None:
    from mednets.anatomy import label_names
    from mednets.data.dicom_seg import write_dicom_seg

    source = read_volume(dicom_series)
    structures = {name: label for name, label in label_names().items() if label}
    labels = np.zeros(source.array.shape, dtype=np.uint8)
    labels[10:14, 8:12, 8:12] = structures["right_kidney"]
    labels[10:14, 8:12, 20:24] = structures["left_kidney"]
    written = write_dicom_seg(Volume(labels, source.affine), describe_structures(structures),
                              source.meta["slice_files"], tmp_path / "seg.dcm", model_name="test")  # fmt: skip
    assert [s.name for s in written] == ["right_kidney", "left_kidney"]
    seg, numbers = read_dicom_seg(tmp_path / "seg.dcm")
    right, left = (seg.SegmentSequence[numbers[label] - 1] for label in ("Right kidney", "Left kidney"))
    assert right.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    assert right.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    mask = np.asarray(seg.get_volume(combine_segments=True, relabel=True).array)
    assert int((mask == numbers["Right kidney"]).sum()) == 64 and int((mask == numbers["Left kidney"]).sum()) == 64


def test_a_dicom_seg_leaves_out_absent_structures_and_says_why(run, dicom_series: Path, tmp_path: Path,
                                                               monkeypatch) -> None:  # fmt: skip
    _paint_everything(run, monkeypatch)
    case = mednets.predict(dicom_series, run=run, out=tmp_path, output_format="dicom-seg")
    sidecar = json.loads((tmp_path / "series.json").read_text())
    empty = [name for name, entry in case.structures.items() if entry["voxels"] == 0]
    assert sorted(sidecar["dicom_seg"]["omitted"]) == sorted(empty)
    assert len(sidecar["dicom_seg"]["segments"]) + len(empty) == len(run.structures)


def test_a_derived_dicom_series_joins_its_source_study(dicom_series: Path, tmp_path: Path) -> None:
    source = read_volume(dicom_series)
    derived = Volume((source.array > 0).astype(np.int16), source.affine)
    from mednets.data.dicom import write_dicom_series

    folder = write_dicom_series(derived, tmp_path / "derived", derived_from=source)
    first, original = (pydicom.dcmread(next(f.iterdir()), stop_before_pixels=True) for f in (folder, dicom_series))
    assert first.StudyInstanceUID == original.StudyInstanceUID
    assert first.FrameOfReferenceUID == original.FrameOfReferenceUID
    assert first.SeriesInstanceUID != original.SeriesInstanceUID


def test_nested_dicom_folders_and_a_folder_of_several_series(dicom_series: Path, run, tmp_path: Path) -> None:
    root = tmp_path / "study"
    shutil.copytree(dicom_series, root / "patient1" / "ct")
    volume = read_volume(dicom_series)
    write_volume(Volume(volume.array + 1, volume.affine), root / "patient2" / "ct")
    cases = list_cases([root])
    assert [case.name for case in cases] == ["patient1_ct", "patient2_ct"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for folder in (root / "patient1" / "ct", root / "patient2" / "ct"):
        for file in folder.iterdir():
            shutil.copy(file, mixed / f"{folder.parent.name}_{file.name}")
    uids = sorted(case.series_uid for case in cases)
    assert [case.name for case in list_cases([mixed])] == uids  # several series in one folder: named by UID
    assert [case.series_uid for case in list_cases([mixed], series_uid=uids[1])] == [uids[1]]
    with pytest.raises(InvalidInputError, match="no DICOM series with this UID"):
        list_cases([mixed], series_uid="1.2.3")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run.run_dir), "--input", str(root), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0  # fmt: skip
    assert (out / "patient1_ct.nii.gz").is_file() and (out / "patient2_ct.nii.gz").is_file()
    assert main(["predict", "--run", str(run.run_dir), "--input", str(mixed), "--series-uid", uids[0], "--out",
                 str(tmp_path / "one"), "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "one").glob("*.nii.gz")) == [f"{uids[0]}.nii.gz"]


def test_colliding_output_names_stop_the_run_before_writing(run, phantom: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(phantom, other / phantom.name)
    out = tmp_path / "out"
    code = main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--input", str(other / phantom.name),
                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    message = capsys.readouterr().err
    assert code == 2 and "two inputs would write the same output" in message
    assert str(phantom) in message and str(other / phantom.name) in message
    assert not out.exists() or not any(out.iterdir())


def test_json_output_and_unknown_roi(run, phantom: Path, tmp_path: Path, capsys) -> None:
    code = main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--out", str(tmp_path), "--device",
                 "cpu", "--json", "--statistics", "--roi-subset", "liver", "spleen"])  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["failed"] == [] and record["written"] == [str(tmp_path / "phantom_000.nii.gz")]
    assert set(record["cases"]["phantom_000"]["statistics"]) == {"liver", "spleen"}
    code = main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--out", str(tmp_path / "x"),
                 "--device", "cpu", "--roi-subset", "livr"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "livr" in error and "liver" in error and len(error.strip().splitlines()) == 1


def test_dicom_seg_of_a_nifti_input_is_refused_before_work(run, phantom: Path, tmp_path: Path, capsys) -> None:
    code = main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--out", str(tmp_path / "o"),
                 "--format", "dicom-seg", "--device", "cpu"])  # fmt: skip
    assert code == 2 and "needs a DICOM series input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_input_stops_the_run_before_any_work(run, phantom: Path, tmp_path: Path, capsys) -> None:
    code = main(["predict", "--run", str(run.run_dir), "--input", str(phantom), "--input", str(tmp_path / "typo"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "input not found" in error and "typo" in error and not (tmp_path / "o").exists()
