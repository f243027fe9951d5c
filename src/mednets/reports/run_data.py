"""What the run report reads from a run folder: config, labels, metrics, trainer state, predictions and scores.

`load_run_data(run_dir)` reads the run folder as `mednets train`, `predict` and `evaluate` leave it
(the layout `mednets demo` writes); a part that is missing is None, so the report can say so.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mednets.config import ExperimentConfig
from mednets.engine.run import RunFolder
from mednets.errors import InvalidInputError, MednetsError
from mednets.reports.html import note

__all__ = [
    "PREDICTIONS_DIR",
    "SCORES_FILE",
    "TIMINGS_FILE",
    "RunData",
    "absence_reason",
    "decision",
    "load_run_data",
    "missing_evaluation",
    "read_json",
    "evaluation_rows",
]

PREDICTIONS_DIR = "test_predictions"
SCORES_FILE = "test_scores.json"
TIMINGS_FILE = "timings.json"


@dataclass
class RunData:
    """What the report reads from a run folder; None where a part is missing."""

    run_dir: Path
    config: ExperimentConfig | None
    config_text: str | None
    labels: dict[str, int]  # structure name -> label id (background excluded), from the run's dataset.json
    train_info: dict[str, Any] | None
    preprocessing: dict[str, Any] | None
    metrics: list[dict[str, float]]
    trainer_state: dict[str, Any] | None
    predictions_dir: Path
    scores_path: Path
    evaluation: dict[str, Any] | None
    sidecars: dict[str, dict[str, Any]]
    truth_dir: Path | None
    truth_info: dict[str, Any] | None
    timings: dict[str, Any] | None
    calibration: dict[str, Any] | None = None  # the presence calibration fitted on validation (calibration.json)


def read_json(path: Path) -> Any:
    """The JSON at `path`, or None if there is no such file.

    Raises:
        InvalidInputError: the file exists but is not valid JSON.
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"not valid JSON ({error})", source=str(path)) from error


def _read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of `metrics.csv` with their numeric values (empty cells left out)."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        rows = []
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows


def _dataset_root(image: Path) -> Path | None:
    """The dataset folder of an image in its `imagesTr/` or `imagesTs/`, if it has labels."""
    if image.parent.name in ("imagesTr", "imagesTs") and (image.parent.parent / "labelsTr").is_dir():
        return image.parent.parent
    return None


def _find_truth(run_dir: Path, sidecars: dict[str, dict[str, Any]], truth: Path | None) -> Path | None:
    """The truth folder: given, else the dataset the predicted images came from, else `<run>/phantoms/test`."""
    if truth is not None:
        return truth
    for sidecar in sidecars.values():
        source = Path(sidecar.get("input", {}).get("path", ""))
        root = _dataset_root(source) if source.name else None
        if root is not None:
            return root
    fallback = run_dir / "phantoms" / "test"
    return fallback if (fallback / "labelsTr").is_dir() else None


def load_run_data(run_dir: Path, predictions: Path | None, scores: Path | None, truth: Path | None) -> RunData:
    folder = RunFolder(run_dir)
    config_path = folder.config_path
    config = folder.config() if config_path.is_file() else None
    dataset = read_json(run_dir / "dataset.json")
    labels = {str(k): int(v) for k, v in (dataset or {}).get("labels", {}).items() if int(v) != 0}
    predictions_dir = predictions or run_dir / PREDICTIONS_DIR
    sidecars = (
        {p.name[: -len(".json")]: read_json(p) for p in sorted(predictions_dir.glob("*.json"))}
        if predictions_dir.is_dir()
        else {}
    )
    truth_dir = _find_truth(run_dir, sidecars, truth)
    truth_info = None
    if truth_dir is not None:
        truth_info = read_json(truth_dir / "dataset.json") or read_json(truth_dir.parent / "dataset.json")
    trainer_state = None
    if (folder.checkpoints / "last").is_dir():
        try:
            trainer_state = folder.trainer_state("last")["state"]
        except (MednetsError, KeyError):
            trainer_state = None
    scores_path = scores or run_dir / SCORES_FILE
    return RunData(
        run_dir=run_dir,
        config=config,
        config_text=config_path.read_text(encoding="utf-8") if config is not None else None,
        labels=labels,
        train_info=dataset,
        preprocessing=read_json(run_dir / "preprocessing.json"),
        metrics=_read_metrics(run_dir / "metrics.csv"),
        trainer_state=trainer_state,
        predictions_dir=predictions_dir,
        scores_path=scores_path,
        evaluation=read_json(scores_path),
        sidecars=sidecars,
        truth_dir=truth_dir,
        truth_info=truth_info,
        timings=read_json(run_dir / TIMINGS_FILE),
        calibration=read_json(folder.calibration_path),
    )


def evaluation_rows(run: RunData) -> list[dict[str, Any]]:
    return (run.evaluation or {}).get("rows", [])


def decision(run: RunData, row: dict[str, Any]) -> bool:
    """The presence decision of a row: the sidecar's `present` flag, else probability >= 0.5."""
    entry = run.sidecars.get(row["case"], {}).get("structures", {}).get(row["structure"], {})
    return bool(entry["present"]) if "present" in entry else row["presence_probability"] >= 0.5


def absence_reason(run: RunData, case: str, structure: str) -> str:
    record = (run.truth_info or {}).get("cases", {}).get(case, {})
    return record.get("absent", {}).get(structure, "reason not recorded")


def missing_evaluation(run: RunData) -> str:
    return note(
        f"No evaluation in {run.scores_path}: run `mednets evaluate --pred {run.predictions_dir} --truth TRUTH "
        f"--out {run.scores_path.with_suffix('')}` and write the report again."
    )
