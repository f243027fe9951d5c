"""Evaluate predicted label maps against the truth: per case and structure, then summaries.

Predictions and truths are matched by case name (`<case>.nii.gz`, or 2D `<case>.png|.tif`, in both folders; a truth folder
may also be a dataset folder, whose `labelsTr/` is used). A prediction's JSON sidecar
(`<case>.json`, written by `mednets predict`) supplies presence probabilities (AUROC, calibration)
and the predictor's own presence calls (accuracy, F1: its thresholds and volume floor, not 0.5);
without one, presence is read from the mask. Conventions: `mednets.metrics`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mednets import anatomy
from mednets.atomic import atomic_write_text
from mednets.data.io import case_name, read_volume
from mednets.errors import InvalidInputError
from mednets.metrics import mean_defined, presence_metrics, score_structures

__all__ = ["Evaluation", "evaluate_folders", "format_summary", "write_evaluation"]


@dataclass
class Evaluation:
    """Per-case rows (one per case and structure) and the summary over them."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def _case_files(folder: Path) -> dict[str, Path]:
    """{case: label map file} of a folder (or of a dataset folder's `labelsTr/`), by the format table's endings."""
    if (folder / "labelsTr").is_dir():
        folder = folder / "labelsTr"
    if not folder.is_dir():
        raise InvalidInputError("folder not found", source=str(folder))
    return {case_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and case_name(p) != p.name}


def _labels_of(truth_folder: Path) -> dict[str, int]:
    """Structure name -> id from the truth's dataset.json if there is one, else the organ registry."""
    for candidate in (truth_folder / "dataset.json", truth_folder.parent / "dataset.json"):
        if candidate.is_file():
            labels = json.loads(candidate.read_text(encoding="utf-8"))["labels"]
            return {str(name): int(i) for name, i in labels.items() if int(i) != 0}
    return {name: i for name, i in anatomy.label_names().items() if i != 0}


def _sidecar_structures(sidecar: Path) -> dict[str, Any]:
    """The `structures` of a prediction's JSON sidecar (presence probability and decision per structure)."""
    try:
        structures = json.loads(sidecar.read_text(encoding="utf-8"))["structures"]
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidInputError("not a prediction sidecar", source=str(sidecar),
                                expected='JSON with "structures" as written by `mednets predict`',
                                got=f"{type(error).__name__}: {error}") from error  # fmt: skip
    if not isinstance(structures, dict) or not all(isinstance(v, dict) for v in structures.values()):
        raise InvalidInputError("not a prediction sidecar", source=str(sidecar),
                                expected='"structures": {name: {"probability", "present"}}', got=structures)  # fmt: skip
    return structures


def evaluate_folders(
    prediction_folder: str | Path,
    truth_folder: str | Path,
    *,
    nsd_tolerance_mm: float = 2.0,
    min_voxels: int = anatomy.MIN_VOXELS,
) -> Evaluation:
    """Score every case of the truth folder against its prediction.

    Raises:
        InvalidInputError: a truth case without a prediction (never silently dropped from the scores), no
            case in common, or a prediction whose geometry differs from its truth.
    """
    prediction_folder, truth_folder = Path(prediction_folder), Path(truth_folder)
    predictions, truths = _case_files(prediction_folder), _case_files(truth_folder)
    missing = sorted(truths.keys() - predictions.keys())
    if missing and predictions.keys() & truths.keys():
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InvalidInputError(f"{len(missing)} case(s) of the truth have no prediction: {shown}",
                                source=str(prediction_folder), expected=f"one prediction per case of {truth_folder}")  # fmt: skip
    cases = sorted(predictions.keys() & truths.keys())
    if not cases:
        raise InvalidInputError(
            "no case has both a prediction and a truth",
            source=str(prediction_folder),
            expected=f"<case>.nii.gz files named as in {truth_folder}",
            got=f"{len(predictions)} predictions, {len(truths)} truths",
        )
    labels = _labels_of(truth_folder)
    rows: list[dict[str, Any]] = []
    for case in cases:
        predicted, truth = read_volume(predictions[case]), read_volume(truths[case])
        if predicted.array.shape != truth.array.shape:
            raise InvalidInputError(
                "prediction and truth differ in shape", source=str(predictions[case]),
                expected=truth.array.shape, got=predicted.array.shape,
            )  # fmt: skip
        sidecar = predictions[case].with_name(f"{case}.json")
        structures = _sidecar_structures(sidecar) if sidecar.is_file() else {}
        scores = score_structures(predicted.array, truth.array, labels, truth.spacing,
                                  nsd_tolerance_mm=nsd_tolerance_mm, min_voxels=min_voxels)  # fmt: skip
        for name, score in scores.items():
            entry = structures.get(name, {})
            probability = entry.get("probability")
            rows.append(
                {
                    "case": case,
                    "structure": name,
                    **score.as_dict(),
                    "presence_probability": float(score.present_in_prediction) if probability is None else probability,
                    "presence_decision": bool(entry.get("present", score.present_in_prediction)),
                }
            )
    return Evaluation(rows, _summarise(rows))


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    present = [r for r in rows if r["present_in_truth"]]
    absent = [r for r in rows if not r["present_in_truth"]]
    false_positive = sorted(r["false_positive_ml"] for r in absent)
    per_structure = {}
    for name in dict.fromkeys(r["structure"] for r in rows):
        mine = [r for r in present if r["structure"] == name]
        per_structure[name] = {
            "dice": mean_defined(r["dice"] for r in mine),
            "hd95_mm": mean_defined(r["hd95_mm"] for r in mine),
            "nsd": mean_defined(r["nsd"] for r in mine),
            "cases_present": len(mine),
            "cases_absent": sum(1 for r in absent if r["structure"] == name),
        }
    return {
        "cases": len({r["case"] for r in rows}),
        "dice": mean_defined(r["dice"] for r in present),
        "hd95_mm": mean_defined(r["hd95_mm"] for r in present),
        "nsd": mean_defined(r["nsd"] for r in present),
        "presence": presence_metrics(
            [r["presence_probability"] for r in rows],
            [r["present_in_truth"] for r in rows],
            decisions=[r["presence_decision"] for r in rows],
        ),
        "absent_structures": len(absent),
        "false_positive_ml": {
            "mean": mean_defined(false_positive),
            "median": _median(false_positive),
            "max": max(false_positive) if false_positive else None,
            "hallucinated": sum(1 for v in false_positive if v > 0),
        },
        "per_structure": per_structure,
    }


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def write_evaluation(evaluation: Evaluation, out: str | Path) -> list[Path]:
    """Write `<out>.csv` (one row per case and structure) and `<out>.json` (rows and summary)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".csv", ".json") else out
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(evaluation.rows[0]))
    writer.writeheader()
    writer.writerows(evaluation.rows)
    csv_path = atomic_write_text(stem.with_suffix(".csv"), buffer.getvalue())
    json_path = atomic_write_text(
        stem.with_suffix(".json"), json.dumps({"summary": evaluation.summary, "rows": evaluation.rows}, indent=2)
    )
    return [csv_path, json_path]


def format_summary(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the headline numbers for printing."""

    def show(value: Any, digits: int = 3) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    fp = summary["false_positive_ml"]
    presence = summary["presence"]
    return [
        ("cases", str(summary["cases"])),
        ("Dice (present structures)", show(summary["dice"])),
        ("HD95 mm (present structures)", show(summary["hd95_mm"], 1)),
        ("NSD (present structures)", show(summary["nsd"])),
        ("presence accuracy / F1 / AUROC / ECE",
         " / ".join(show(presence[k]) for k in ("accuracy", "f1", "auroc", "ece"))),
        ("absent structures (case x structure)", str(summary["absent_structures"])),
        ("false-positive mL on absent: mean / median / max",
         " / ".join(show(fp[k], 2) for k in ("mean", "median", "max"))),
        ("absent structures painted (hallucinated)", str(fp["hallucinated"])),
    ]  # fmt: skip
