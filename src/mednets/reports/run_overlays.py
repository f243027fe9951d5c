"""The run report's case overlays: three chosen test cases, image, truth and prediction, with their tables."""

from __future__ import annotations

import html
import statistics
from pathlib import Path

import numpy as np

from mednets import anatomy
from mednets.data.io import read_volume
from mednets.reports.html import fmt, note, section, table
from mednets.reports.html import image as embed
from mednets.reports.run_data import RunData, absence_reason, evaluation_rows, missing_evaluation
from mednets.reports.run_figures import plot_case_overlay

__all__ = ["overlays_section"]

_OUT_OF_VIEW = "outside the field of view"  # the start of the phantoms' truncation reasons


def _label_path(run: RunData, case: str) -> Path | None:
    if run.truth_dir is None:
        return None
    for candidate in (run.truth_dir / "labelsTr" / f"{case}.nii.gz", run.truth_dir / f"{case}.nii.gz"):
        if candidate.is_file():
            return candidate
    return None


def _image_path(run: RunData, case: str) -> Path | None:
    source = run.sidecars.get(case, {}).get("input", {}).get("path")
    if source and Path(source).exists():
        return Path(source)
    if run.truth_dir is not None:
        candidate = run.truth_dir / "imagesTr" / f"{case}_0000.nii.gz"
        return candidate if candidate.is_file() else None
    return None


def _chosen_cases(run: RunData) -> list[tuple[str, str, str | None]]:
    """Up to three (case, why shown, absent organ to centre on): one with an organ removed, the best and the worst."""
    rows = evaluation_rows(run)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    absent = [r for r in rows if not r["present_in_truth"]]
    removed = [r for r in absent if not absence_reason(run, r["case"], r["structure"]).startswith(_OUT_OF_VIEW)]
    chosen: list[tuple[str, str, str | None]] = []
    if removed or absent:
        row = max(removed or absent, key=lambda r: r["false_positive_ml"])
        reason = absence_reason(run, row["case"], row["structure"])
        chosen.append((row["case"], f"{row['structure']} absent: {reason}", row["structure"]))
    mean_dice = {}
    for case in cases:
        values = [r["dice"] for r in rows if r["case"] == case and r["dice"] is not None]
        mean_dice[case] = statistics.mean(values) if values else -1.0
    rest = sorted((c for c in cases if c not in {c for c, _, _ in chosen}), key=lambda c: mean_dice[c])
    if rest:
        chosen.append((rest[-1], f"highest mean Dice ({mean_dice[rest[-1]]:.3f})", None))
    if len(rest) > 1:
        chosen.append((rest[0], f"lowest mean Dice ({mean_dice[rest[0]]:.3f})", None))
    return chosen


def _centre_point(run: RunData, truth: np.ndarray | None, prediction: np.ndarray, focus: str | None) -> list[float]:
    """The slice point `(d, h, w)` of a case; for an absent organ `focus`, a point that shows where it would be.

    In order: where the absent organ was painted; the centre of its contralateral partner in this case
    (a nephrectomy is shown beside the remaining kidney); its mean centre in the other cases; else
    the centre of the labels.
    """
    if focus is not None:
        label = run.labels[focus]
        if (prediction == label).any():
            return np.argwhere(prediction == label).mean(0).tolist()
        pair = anatomy.organ(focus).pair if focus in anatomy.organ_names() else None
        if pair in run.labels and truth is not None and (truth == run.labels[pair]).any():
            return np.argwhere(truth == run.labels[pair]).mean(0).tolist()
        centres = []
        for case in run.sidecars:
            path = _label_path(run, case)
            labels = read_volume(path).reoriented("LPS").array if path is not None else None
            if labels is not None and labels.shape == prediction.shape and (labels == label).any():
                centres.append(np.argwhere(labels == label).mean(0))
        if centres:
            return np.mean(centres, axis=0).tolist()
    reference = truth if truth is not None and truth.any() else prediction
    if reference.any():
        return np.argwhere(reference > 0).mean(0).tolist()
    return [n / 2 for n in prediction.shape]


def _case_table(run: RunData, case: str, truth: np.ndarray | None, voxel_ml: float) -> str:
    rows, classes = [], []
    sidecar = run.sidecars.get(case, {}).get("structures", {})
    scores = {r["structure"]: r for r in evaluation_rows(run) if r["case"] == case}
    for name, label in run.labels.items():
        entry = sidecar.get(name, {})
        score = scores.get(name)
        in_truth = score["present_in_truth"] if score else (truth is not None and bool((truth == label).any()))
        decided = entry.get("present")
        reason = absence_reason(run, case, name)
        truth_text = (
            "present" if in_truth else "absent: " + ("out of view" if reason.startswith(_OUT_OF_VIEW) else reason)
        )
        decision = "n/a" if decided is None else ("present" if decided else "absent")
        true_ml = f"{float((truth == label).sum()) * voxel_ml:.1f}" if truth is not None else "n/a"
        rows.append(
            [
                name,
                truth_text,
                f"{decision} {fmt(entry.get('probability'), 2)}",
                fmt(entry.get("volume_ml"), 1),
                true_ml,
                fmt(score["dice"] if score else None),
            ]
        )
        classes.append("" if decided is None else ("good" if bool(decided) == bool(in_truth) else "bad"))
    return table(["organ", "truth", "decision (p)", "pred. mL", "true mL", "Dice"], rows, classes)


def overlays_section(run: RunData) -> tuple[str, str, str]:
    title = "Slice overlays"
    if not run.sidecars:
        return section("overlays", title, note(f"No predictions in {run.predictions_dir}: nothing to overlay."))
    if not run.evaluation:
        return section("overlays", title, missing_evaluation(run))
    content = []
    for case, why, focus_name in _chosen_cases(run):
        image_path, prediction_path = _image_path(run, case), run.predictions_dir / f"{case}.nii.gz"
        if image_path is None or not prediction_path.is_file():
            content.append(note(f"{case}: its image or prediction file is missing."))
            continue
        image = read_volume(image_path).reoriented("LPS")
        prediction = read_volume(prediction_path).reoriented("LPS").array
        label_path = _label_path(run, case)
        truth = read_volume(label_path).reoriented("LPS").array if label_path else None
        point = _centre_point(run, truth, prediction, focus_name if focus_name in run.labels else None)
        figure = plot_case_overlay(image.array, truth, prediction, image.spacing, [round(c) for c in point],
                                   structures=run.labels)  # fmt: skip
        content += [
            f"<h3>{html.escape(case)}: {html.escape(why)}</h3>",
            f'<div class="case">{embed(figure, f"overlay of {case}")}',
            f"<div>{_case_table(run, case, truth, image.voxel_volume_ml())}</div></div>",
        ]
    content.append(note("Green rows: the presence decision agrees with the truth; red rows: it does not."))
    return section("overlays", title, *content)
