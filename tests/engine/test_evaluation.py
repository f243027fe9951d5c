"""`mednets evaluate`: per-case scoring of folders, summaries, sidecar presence, CSV/JSON out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mednets.cli import main
from mednets.data.io import write_volume
from mednets.data.volume import Volume
from mednets.engine.evaluation import evaluate_folders
from mednets.errors import InvalidInputError
from mednets.metrics import presence_metrics

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 voxels


def write_case(folder: Path, case: str, labels: np.ndarray, sidecar: dict | None = None) -> None:
    write_volume(Volume(labels.astype(np.uint8), AFFINE), folder / f"{case}.nii.gz")
    if sidecar is not None:
        (folder / f"{case}.json").write_text(json.dumps({"structures": sidecar}))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    spleen_and_liver = np.zeros((12, 12, 12), np.uint8)
    spleen_and_liver[1:5, 1:5, 1:5] = 1  # spleen
    spleen_and_liver[6:11, 6:11, 6:11] = 6  # liver
    write_case(truth, "a", spleen_and_liver)
    liver_only = np.where(spleen_and_liver == 6, 6, 0)  # splenectomy
    write_case(truth, "b", liver_only)
    write_case(pred, "a", spleen_and_liver, {"spleen": {"probability": 0.9}, "liver": {"probability": 0.95}})
    hallucinated = liver_only.copy()
    hallucinated[1:3, 1:3, 1:3] = 1  # 8 voxels of spleen painted where there is none: 64 mm^3
    write_case(pred, "b", hallucinated, {"spleen": {"probability": 0.7}, "liver": {"probability": 0.97}})
    return pred, truth


def test_summary_counts_hallucinations_in_millilitres(folders: tuple[Path, Path]) -> None:
    evaluation = evaluate_folders(*folders)
    summary = evaluation.summary
    assert summary["cases"] == 2
    assert summary["dice"] == pytest.approx(1.0)  # every present organ is perfect
    assert summary["false_positive_ml"]["max"] == pytest.approx(0.064)
    assert summary["false_positive_ml"]["hallucinated"] == 1
    assert summary["per_structure"]["spleen"]["cases_absent"] == 1
    # Presence from the sidecars: the absent spleen at 0.7 is a wrong "present" decision.
    spleen_b = next(r for r in evaluation.rows if r["case"] == "b" and r["structure"] == "spleen")
    assert spleen_b["presence_probability"] == 0.7 and spleen_b["dice"] is None


def test_presence_accuracy_scores_the_predictors_own_calls(tmp_path: Path) -> None:
    """A sidecar's `present` (its per-structure threshold, its volume floor) is the decision scored, not 0.5."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    liver = np.zeros((12, 12, 12), np.uint8)
    liver[6:11, 6:11, 6:11] = 6
    write_case(truth, "a", liver)  # no spleen
    # The head says 0.7 for the spleen, but the predictor called it absent (e.g. its floor emptied it).
    write_case(pred, "a", liver, {"spleen": {"probability": 0.7, "present": False},
                                  "liver": {"probability": 0.4, "present": True}})  # fmt: skip
    evaluation = evaluate_folders(pred, truth)
    spleen = next(r for r in evaluation.rows if r["structure"] == "spleen")
    assert spleen["presence_probability"] == 0.7 and spleen["presence_decision"] is False
    # 13 structures: spleen (absent, called absent) and liver (present, called present at 0.4) are right,
    # the 11 others have no sidecar entry and an empty mask on both sides: right as well.
    assert evaluation.summary["presence"]["accuracy"] == pytest.approx(1.0)
    # Thresholded at 0.5 the same probabilities would get both wrong.
    rows = evaluation.rows
    at_half = presence_metrics([r["presence_probability"] for r in rows], [r["present_in_truth"] for r in rows])
    assert at_half["accuracy"] == pytest.approx(11 / 13)


def test_cli_writes_csv_and_json(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, truth = folders
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(tmp_path / "scores")]) == 0
    assert "false-positive mL on absent" in capsys.readouterr().out
    data = json.loads((tmp_path / "scores.json").read_text())
    assert len(data["rows"]) == 2 * 13 and (tmp_path / "scores.csv").read_text().startswith("case,structure,")


def test_cli_json_prints_the_summary_only(folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pred, truth = folders
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["summary"]["cases"] == 2 and record["written"] == []
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_no_common_case_is_a_clear_error(tmp_path: Path, folders: tuple[Path, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="no case has both a prediction and a truth"):
        evaluate_folders(empty, folders[1])


def test_a_missing_prediction_is_an_error_not_dropped(folders: tuple[Path, Path]) -> None:
    pred, truth = folders
    (pred / "b.nii.gz").unlink()
    with pytest.raises(InvalidInputError, match="1 case\\(s\\) of the truth have no prediction: b"):
        evaluate_folders(pred, truth)
