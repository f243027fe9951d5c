"""Prediction: label maps with the input's exact geometry, sidecars for every organ, failures skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mednets import anatomy
from mednets.cli import main
from mednets.data.io import read_volume
from mednets.engine.api import load_run, predict_paths
from mednets.engine.inference import drop_small_structures


def test_prediction_on_real_nifti_and_dicom_keeps_their_geometry(
    tiny_run: Path, shared_dir: Path, tmp_path: Path
) -> None:
    nifti = shared_dir / "data" / "ct" / "example_ct_sm.nii.gz"
    dicom = shared_dir / "data" / "ct" / "example_ct_dicom"
    result = predict_paths(load_run(tiny_run), [nifti, dicom], tmp_path, progress=False)
    assert not result["failed"]

    predicted = read_volume(tmp_path / "example_ct_sm.nii.gz")
    source = read_volume(nifti)
    assert predicted.array.shape == source.array.shape and predicted.array.dtype == np.uint8
    np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-4)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom)))
    reference = reader.Execute()
    written = sitk.ReadImage(str(tmp_path / "example_ct_dicom.nii.gz"))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-5)

    for case in ("example_ct_sm", "example_ct_dicom"):
        sidecar = json.loads((tmp_path / f"{case}.json").read_text())
        assert set(sidecar["structures"]) == set(anatomy.organ_names())
        stages = ["read", "preprocess", "inference", "labels to the input grid", "write"]
        assert list(sidecar["seconds"]) == stages and all(t >= 0 for t in sidecar["seconds"].values())
        for entry in sidecar["structures"].values():
            assert {"present", "probability", "confidence", "volume_ml"} <= set(entry)
            assert 0.0 <= entry["probability"] <= 1.0


def test_unreadable_input_is_reported_and_the_rest_continue(tiny_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    phantom = sorted((tiny_run / "phantoms" / "test" / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    code = main(["predict", "--run", str(tiny_run), "--input", str(broken), "--input", str(phantom), "--out", str(out)])
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000.ctbl", "phantom_000.json", "phantom_000.nii.gz"]


def test_gating_empties_structures_judged_absent(tiny_sadaan_run: Path, tmp_path: Path) -> None:
    run = load_run(tiny_sadaan_run)
    run.task.calibration = (
        None  # the model's own threshold decides (a calibrated run: tests/engine/test_presence_runs.py)
    )
    run.model.presence_threshold = 1.0  # nothing is judged present
    phantom = sorted((tiny_sadaan_run / "phantoms" / "test" / "imagesTr").glob("*.nii.gz"))[0]
    predict_paths(run, [phantom], tmp_path, progress=False)
    assert not read_volume(tmp_path / "phantom_000.nii.gz").array.any()
    sidecar = json.loads((tmp_path / "phantom_000.json").read_text())["structures"]
    assert all(not e["present"] and "why_empty" in e for e in sidecar.values())


def test_structures_painted_far_smaller_than_in_training_are_emptied() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[:2, :2, :2] = 1  # 8 voxels = 1 mL: a kidney of at least 40 mL in training -> noise
    labels[5:, 5:, 5:] = 2  # 125 voxels = 15.6 mL, above a quarter of 20 mL -> kept
    labels[0, 9, 9] = 3  # one voxel of a structure without a training volume -> kept
    structures = {"kidney": 1, "spleen": 2, "other": 3}
    dropped = drop_small_structures(labels, structures, 0.125, {"kidney": 40.0, "spleen": 20.0}, 0.25)
    assert list(dropped) == ["kidney"] and "1.00 mL" in dropped["kidney"] and "40.00 mL" in dropped["kidney"]
    assert not (labels == 1).any() and (labels == 2).sum() == 125 and (labels == 3).sum() == 1
    assert drop_small_structures(labels, structures, 0.125, {"spleen": 1000.0}, 0.0) == {}  # off


def test_runs_record_each_structures_smallest_training_volume(tiny_sadaan_run: Path) -> None:
    preprocessing = json.loads((tiny_sadaan_run / "preprocessing.json").read_text(encoding="utf-8"))
    smallest = preprocessing["smallest_training_volume_ml"]
    assert set(smallest) <= set(anatomy.organ_names()) and smallest["liver"] > smallest["right_adrenal"] > 0
