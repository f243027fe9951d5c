"""Calibrate a run's presence decisions on its validation cases, as the last step of training.

The validation cases are predicted exactly as `mednets predict` will predict a user's scan (same
preprocessing, windows, flips and geometry), with no gating and no volume floor, which gives for
every case and structure the presence logit, the painted volume and the truth. From these alone:

1. per-structure temperatures (`tasks.calibration.fit_temperatures`);
2. the decision threshold on the calibrated probabilities (`choose_threshold`);
3. the volume floor: half the smallest ratio of a correctly kept structure's painted volume to its
   smallest training volume, at most `MAX_VOLUME_FLOOR` (a floor that would have emptied a present
   validation structure is never chosen).

They are written to the run's `calibration.json` with the validation ECE before and after;
`load_run` applies them, so every sidecar carries calibrated probabilities. No test case is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mednets.atomic import atomic_write_text
from mednets.data.dataset import Dataset, load_dataset, split_cases
from mednets.data.io import read_any
from mednets.engine.inference import load_run, predict_image
from mednets.engine.run import RunFolder
from mednets.metrics import expected_calibration_error
from mednets.tasks.calibration import PresenceCalibration, choose_threshold, fit_temperatures

__all__ = ["calibrate_run", "recalibrate", "MAX_VOLUME_FLOOR"]

MAX_VOLUME_FLOOR = 0.25  # of the smallest training volume: the floor predict used before calibration existed
log = logging.getLogger(__name__)


def calibrate_run(
    run_dir: str | Path, dataset: Dataset, cases: Sequence[str], *, device: str = "auto", progress: bool = False
) -> PresenceCalibration | None:
    """Fit and save the presence calibration of a run on `cases` (its validation cases) of `dataset`.

    Returns None, writing nothing, for a model without presence logits or cases with several
    channels (the predictor reads one image per case).
    """
    if not cases or len(dataset.channel_names) != 1:
        log.info("presence calibration skipped: %s", "no validation cases" if not cases else "multi-channel cases")
        return None
    run = load_run(run_dir, device=device)
    run.task.calibration = None  # the raw logits are what is fitted
    logits, truth, painted = [], [], []
    for case_id in tqdm(cases, desc="calibrating presence", unit="case", disable=not progress, leave=False):
        case = dataset.case(case_id)
        prediction = predict_image(run, read_any(case.images[0]), gating=False, min_volume_fraction=0.0)
        if prediction.presence_logits is None:
            return None
        presence = dataset.presence(case_id)
        logits.append(prediction.presence_logits)
        truth.append([presence[name] for name in run.structures])
        painted.append([prediction.structures[name]["volume_ml"] for name in run.structures])
    z = torch.tensor(logits, dtype=torch.float64)  # [N, K]
    present = torch.tensor(truth, dtype=torch.bool)
    temperatures = fit_temperatures(z, present)
    calibration = PresenceCalibration(structures=list(run.structures), temperatures=temperatures)
    probabilities = calibration.probabilities(z)
    calibration.threshold = choose_threshold(probabilities, present)
    called = (probabilities >= calibration.threshold).numpy()
    calibration.volume_floor_fraction = _volume_floor(np.asarray(painted), present.numpy() & called, run.structures,
                                                      run.preprocessing.smallest_training_volume_ml)  # fmt: skip
    calibration.fitted_on = _summary(z, present, probabilities, called, len(cases))
    atomic_write_text(RunFolder(run_dir).calibration_path, json.dumps(calibration.to_dict(), indent=2) + "\n")
    log.info("presence calibration: %s", calibration.fitted_on)
    return calibration


def recalibrate(run_dir: str | Path, *, device: str = "auto", progress: bool = False) -> PresenceCalibration | None:
    """Fit a finished run's calibration again on its validation split (e.g. a run trained before calibration).

    The split is the run's own: its config's dataset, `val_fraction` and `split_seed` over the training cases.
    """
    config = RunFolder(run_dir).config()
    dataset = load_dataset(config.data.dataset)
    cases = [case.case_id for case in dataset.training]
    _, validation = split_cases(cases, val_fraction=config.data.val_fraction, seed=config.data.split_seed)
    return calibrate_run(run_dir, dataset, validation, device=device, progress=progress)


def _volume_floor(
    painted_ml: np.ndarray, kept: np.ndarray, structures: dict[str, int], smallest_ml: dict[str, float]
) -> float:
    """Half the smallest painted / smallest-training-volume ratio of the kept structures, at most `MAX_VOLUME_FLOOR`."""
    ratios = [painted_ml[i, k] / smallest_ml[name] for k, name in enumerate(structures)
              for i in range(painted_ml.shape[0]) if kept[i, k] and smallest_ml.get(name, 0) > 0]  # fmt: skip
    return round(float(min([MAX_VOLUME_FLOOR, *[0.5 * r for r in ratios]])), 4)


def _summary(
    logits: torch.Tensor, present: torch.Tensor, probabilities: torch.Tensor, called: np.ndarray, cases: int
) -> dict[str, Any]:
    truth = present.numpy().ravel()
    raw = torch.sigmoid(logits).numpy().ravel()
    return {
        "validation_cases": cases,
        "present_pairs": int(truth.sum()),
        "absent_pairs": int((~truth).sum()),
        "ece_before": round(expected_calibration_error(raw, truth), 4),
        "ece_after": round(expected_calibration_error(probabilities.numpy().ravel(), truth), 4),
        "errors_at_threshold": int((called.ravel() != truth).sum()),
    }
