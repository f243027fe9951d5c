"""A segmenter with a presence head, trained, calibrated on its validation cases and predicting calibrated presence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mednets.config import load_config
from mednets.data.io import read_any
from mednets.engine.inference import load_run, predict_image
from mednets.engine.training import run_training


@pytest.fixture(scope="module")
def presence_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("presence_run")
    config = load_config(None, [
        "model.name=dynunet", "model.overrides={filters: [4, 8, 16, 32, 64], presence_head: true}",
        "data.patch_size=[32, 32, 32]", "data.phantoms={n_train: 8, n_test: 2, shape: [32, 32, 32]}",
        "data.val_fraction=0.25", "train.max_steps=2", "train.val_every=2", "train.batch_size=2",
    ])  # fmt: skip
    run_training(config, run_dir, progress=False)
    return run_dir


def test_training_ends_with_a_calibration_fitted_on_the_validation_cases_only(presence_run: Path) -> None:
    calibration = json.loads((presence_run / "calibration.json").read_text())
    assert len(calibration["temperatures"]) == len(calibration["structures"]) == 13
    assert calibration["fitted_on"]["validation_cases"] == 2  # 25% of the 8 training cases; no test case
    assert 0.05 <= calibration["threshold"] <= 0.95
    assert 0 <= calibration["volume_floor_fraction"] <= 0.25


def test_the_sidecar_carries_the_calibrated_probabilities(presence_run: Path) -> None:
    run = load_run(presence_run)
    image = sorted((presence_run / "phantoms" / "test" / "imagesTr").glob("*.nii.gz"))[0]
    prediction = predict_image(run, read_any(image))
    expected = run.task.calibration.probabilities(torch.tensor(prediction.presence_logits))
    for index, entry in enumerate(prediction.structures.values()):
        assert "presence_source" not in entry  # from the head, not read from the mask
        assert entry["probability"] == pytest.approx(float(expected[index]), abs=1e-6)
        if entry["probability"] < run.task.calibration.threshold:
            assert not entry["present"] and entry["voxels"] == 0
    assert run.inference.min_volume_fraction == run.task.calibration.volume_floor_fraction


def test_calibrate_fits_the_same_calibration_again_from_the_run_alone(presence_run: Path) -> None:
    from mednets.cli import main

    first = json.loads((presence_run / "calibration.json").read_text())
    (presence_run / "calibration.json").unlink()
    assert main(["calibrate", "--run", str(presence_run)]) == 0
    again = json.loads((presence_run / "calibration.json").read_text())
    assert again["fitted_on"] == first["fitted_on"]
    assert again["temperatures"] == pytest.approx(first["temperatures"], rel=1e-6)
