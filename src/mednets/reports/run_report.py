"""The run report: one self-contained HTML page of a training, prediction and evaluation run.

`write_run_report(run_dir)` reads the run folder as `mednets train`, `predict` and `evaluate` leave
it (the layout `mednets demo` writes):

    config.yaml, dataset.json, preprocessing.json, metrics.csv, checkpoints/   mednets train
    test_predictions/<case>.nii.gz and <case>.json                             mednets predict --out
    test_scores.json                                                           mednets evaluate --out
    timings.json (stage times and machine, optional)                           mednets demo

The truth of a predicted case is found through its sidecar (`input.path`: an image in a dataset
folder's `imagesTr/`, whose `labelsTr/` holds the truth), unless given. That dataset's
`dataset.json` says why each absent organ is absent (its scenario). A section whose inputs are
missing says so in the page instead of failing. Figures are PNGs embedded as base64 data URIs.
"""

from __future__ import annotations

import csv
import datetime
import html
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mednets import anatomy
from mednets.atomic import atomic_write_text
from mednets.config import ExperimentConfig, load_config
from mednets.data.io import read_volume
from mednets.engine.checkpoints import load_trainer_state
from mednets.engine.training import build_model_for_data
from mednets.errors import InvalidInputError, MednetsError
from mednets.models import get_model_spec
from mednets.reports.figures import figure_to_base64
from mednets.reports.measure import machine_description
from mednets.reports.model_report import ModelMeasurements, describe_model, model_figures, render_html_sections
from mednets.reports.run_figures import (
    plot_absent_false_positives,
    plot_calibration,
    plot_case_overlay,
    plot_dice_per_structure,
    plot_presence_confusion,
    plot_training_curves,
)

__all__ = ["PREDICTIONS_DIR", "SCORES_FILE", "TIMINGS_FILE", "REPORT_FILE", "write_run_report"]

PREDICTIONS_DIR = "test_predictions"
SCORES_FILE = "test_scores.json"
TIMINGS_FILE = "timings.json"
REPORT_FILE = "report.html"
_OUT_OF_VIEW = "outside the field of view"  # the start of the phantoms' truncation reasons


# ----------------------------------------------------------------------------------------------
# Reading the run folder


@dataclass
class _Run:
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


def _read_json(path: Path) -> Any:
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


def _load(run_dir: Path, predictions: Path | None, scores: Path | None, truth: Path | None) -> _Run:
    config_path = run_dir / "config.yaml"
    config = load_config(config_path) if config_path.is_file() else None
    dataset = _read_json(run_dir / "dataset.json")
    labels = {str(k): int(v) for k, v in (dataset or {}).get("labels", {}).items() if int(v) != 0}
    predictions_dir = predictions or run_dir / PREDICTIONS_DIR
    sidecars = (
        {p.name[: -len(".json")]: _read_json(p) for p in sorted(predictions_dir.glob("*.json"))}
        if predictions_dir.is_dir()
        else {}
    )
    truth_dir = _find_truth(run_dir, sidecars, truth)
    truth_info = None
    if truth_dir is not None:
        truth_info = _read_json(truth_dir / "dataset.json") or _read_json(truth_dir.parent / "dataset.json")
    trainer_state = None
    if (run_dir / "checkpoints" / "last").is_dir():
        try:
            trainer_state = load_trainer_state(run_dir / "checkpoints" / "last")["state"]
        except (MednetsError, KeyError):
            trainer_state = None
    scores_path = scores or run_dir / SCORES_FILE
    return _Run(
        run_dir=run_dir,
        config=config,
        config_text=config_path.read_text(encoding="utf-8") if config is not None else None,
        labels=labels,
        train_info=dataset,
        preprocessing=_read_json(run_dir / "preprocessing.json"),
        metrics=_read_metrics(run_dir / "metrics.csv"),
        trainer_state=trainer_state,
        predictions_dir=predictions_dir,
        scores_path=scores_path,
        evaluation=_read_json(scores_path),
        sidecars=sidecars,
        truth_dir=truth_dir,
        truth_info=truth_info,
        timings=_read_json(run_dir / TIMINGS_FILE),
    )


# ----------------------------------------------------------------------------------------------
# HTML helpers


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(figure: Any, alt: str, css: str = "") -> str:
    css = f' class="{css}"' if css else ""
    return f'<img alt="{html.escape(alt)}"{css} src="data:image/png;base64,{figure_to_base64(figure)}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _section(anchor: str, title: str, *content: str) -> tuple[str, str, str]:
    return anchor, title, f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(content)}</section>'


# ----------------------------------------------------------------------------------------------
# Sections


def _rows(run: _Run) -> list[dict[str, Any]]:
    return (run.evaluation or {}).get("rows", [])


def _decision(run: _Run, row: dict[str, Any]) -> bool:
    """The presence decision of a row: the sidecar's `present` flag, else probability >= 0.5."""
    entry = run.sidecars.get(row["case"], {}).get("structures", {}).get(row["structure"], {})
    return bool(entry["present"]) if "present" in entry else row["presence_probability"] >= 0.5


def _absence_reason(run: _Run, case: str, structure: str) -> str:
    record = (run.truth_info or {}).get("cases", {}).get(case, {})
    return record.get("absent", {}).get(structure, "reason not recorded")


def _headline(run: _Run) -> str:
    cards = []
    summary = (run.evaluation or {}).get("summary")
    if summary:
        fp = summary["false_positive_ml"]
        cards += [
            ("Dice, present organs", _fmt(summary["dice"])),
            ("presence accuracy", _fmt(summary["presence"]["accuracy"])),
            ("absent organs painted", f"{fp['hallucinated']} of {summary['absent_structures']}"),
            ("test cases", str(summary["cases"])),
        ]
    if run.metrics:
        cards.append(("training steps", f"{max(r.get('step', 0) for r in run.metrics):.0f}"))
    if run.trainer_state:
        cards.append(("training time", f"{run.trainer_state['elapsed_seconds'] / 60:.1f} min"))
    if not cards:
        return _note("This run has neither metrics nor an evaluation yet.")
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="value">{html.escape(v)}</div><div class="label">{html.escape(k)}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )


def _what_was_run(run: _Run) -> tuple[str, str, str]:
    rows: list[tuple[str, str]] = [("run folder", str(run.run_dir))]
    if run.config is not None:
        model = run.config.model
        rows.append(("model", model.name + (f" with {model.overrides}" if model.overrides else "")))
        train = run.config.train
        rows.append(
            (
                "training settings",
                f"batch {train.batch_size}, lr {train.lr:g}, up to {train.max_steps} steps"
                f" / {_fmt(train.max_minutes, 1)} min, {train.precision}",
            )
        )
        rows.append(("loss settings", json.dumps(run.config.loss) if run.config.loss else "the task's defaults"))
    if run.train_info:
        generator = run.train_info.get("generator", {})
        detail = f", phantoms {generator.get('shape')} at {generator.get('spacing_mm')} mm" if generator else ""
        dataset = run.config.data.dataset if run.config else None
        val = f", {run.config.data.val_fraction:.0%} of them for validation" if run.config else ""
        rows.append(
            ("training data", f"{dataset or '(run folder)'}: {run.train_info.get('numTraining')} cases{val}{detail}")
        )
    if run.evaluation:
        absent = [r for r in _rows(run) if not r["present_in_truth"]]
        rows.append(
            (
                "test data",
                f"{run.truth_dir or 'unknown truth folder'}: {run.evaluation['summary']['cases']} "
                f"cases, {len(absent)} absent organ-cases",
            )
        )
    if run.metrics:
        step_times = [r["seconds_per_step"] for r in run.metrics if "seconds_per_step" in r]
        if step_times:
            rows.append(("seconds per training step", f"median {statistics.median(step_times):.2f}"))
    if run.trainer_state:
        state = run.trainer_state
        rows.append(
            (
                "training",
                f"{state['step']} steps in {state['elapsed_seconds'] / 60:.1f} min "
                f"(epoch {state['epoch']}); best checkpoint at step {state['best_step']} "
                f"({run.config.train.best_metric if run.config else 'metric'} {_fmt(state['best_value'])})",
            )
        )
    metrics_file = run.run_dir / "metrics.csv"
    if metrics_file.is_file():
        finished = datetime.datetime.fromtimestamp(metrics_file.stat().st_mtime).astimezone()
        rows.append(("training finished", finished.isoformat(timespec="seconds")))
    machine = (run.timings or {}).get("machine")
    rows.append(("machine", machine or f"{machine_description()} (where this report was written)"))
    content = [_table(["what", "value"], rows)]
    stages = (run.timings or {}).get("stages", {})
    if stages:
        total = sum(stages.values())
        content.append("<h3>Wall time by stage</h3>")
        content.append(
            _table(
                ["stage", "seconds", "minutes"],
                [
                    *((k, f"{v:.0f}", f"{v / 60:.1f}") for k, v in stages.items()),
                    ("total", f"{total:.0f}", f"{total / 60:.1f}"),
                ],
            )
        )
    if run.config_text is not None:
        content.append(f"<details><summary>config.yaml</summary><pre>{html.escape(run.config_text)}</pre></details>")
    else:
        content.append(_note(f"No config.yaml in {run.run_dir}: this folder was not made by `mednets train`."))
    return _section("run", "What was run", *content)


def _series(rows: list[dict[str, float]], prefix: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and math.isfinite(value):
                steps, values = out.setdefault(key[len(prefix) :], ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def _training(run: _Run) -> tuple[str, str, str]:
    if not run.metrics:
        return _section("training", "Training", _note(f"No metrics.csv in {run.run_dir}: no training curves."))
    train = _series(run.metrics, "train/")
    validation = _series(run.metrics, "val/")
    shown = {k: v for k, v in validation.items() if k in ("dice", "presence_accuracy", "loss")}
    best_step = (run.trainer_state or {}).get("best_step")
    content = [_img(plot_training_curves(train, shown, best_step=best_step), "training curves")]
    if validation:
        last = {k: v[1][-1] for k, v in validation.items()}
        step = validation[next(iter(validation))][0][-1]
        content.append(f"<h3>Last validation (step {step:.0f})</h3>")
        content.append(_table(list(last), [[_fmt(v) for v in last.values()]]))
    else:
        content.append(_note("No validation ran yet."))
    return _section("training", "Training", *content)


def _missing_evaluation(run: _Run) -> str:
    return _note(
        f"No evaluation in {run.scores_path}: run `mednets evaluate --pred {run.predictions_dir} --truth TRUTH "
        f"--out {run.scores_path.with_suffix('')}` and write the report again."
    )


def _dice(run: _Run) -> tuple[str, str, str]:
    if not run.evaluation:
        return _section("dice", "Dice per organ", _missing_evaluation(run))
    summary = run.evaluation["summary"]
    per = summary["per_structure"]
    rows = [
        [name, _fmt(s["dice"]), _fmt(s["hd95_mm"], 1), _fmt(s["nsd"]), s["cases_present"], s["cases_absent"]]
        for name, s in per.items()
    ]
    rows.append(
        ["all present organs", _fmt(summary["dice"]), _fmt(summary["hd95_mm"], 1), _fmt(summary["nsd"]), "", ""]
    )
    return _section(
        "dice",
        "Dice per organ",
        '<div class="row"><div>',
        _table(["organ", "Dice", "HD95 mm", "NSD", "cases present", "cases absent"], rows),
        "</div><div>",
        _img(plot_dice_per_structure({name: s["dice"] for name, s in per.items()}), "Dice per organ"),
        "</div></div>",
        _note("Dice, HD95 and NSD are over the cases where the organ is present; absent organs are scored below."),
    )


def _presence(run: _Run) -> tuple[str, str, str]:
    if not run.evaluation:
        return _section("presence", "Presence detection", _missing_evaluation(run))
    rows = _rows(run)
    counts = np.zeros((2, 2), dtype=int)
    for row in rows:
        counts[0 if row["present_in_truth"] else 1, 0 if _decision(run, row) else 1] += 1
    metrics = run.evaluation["summary"]["presence"]
    from_mask = any(
        entry.get("presence_source") == "mask"
        for sidecar in run.sidecars.values()
        for entry in sidecar.get("structures", {}).values()
    )
    content = [
        _table(
            ["accuracy", "precision", "recall", "F1", "AUROC", "ECE"],
            [[_fmt(metrics[k]) for k in ("accuracy", "precision", "recall", "f1", "auroc", "ece")]],
        ),
        '<div class="row"><div>',
        _img(plot_presence_confusion(counts), "presence confusion matrix"),
        "</div><div>",
        _img(
            plot_calibration([r["presence_probability"] for r in rows], [r["present_in_truth"] for r in rows]),
            "presence calibration",
        ),
        "</div></div>",
        _note(
            "The confusion matrix counts the model's decisions (the sidecars' present flags); the metrics above "
            "threshold the presence probability at 0.5."
            + (
                " This model has no presence head: presence is read from its masks (probability 0 or 1)."
                if from_mask
                else ""
            )
        ),
    ]
    return _section("presence", "Presence detection", *content)


def _absent(run: _Run) -> tuple[str, str, str]:
    title = "Absent organs: false-positive volume by scenario"
    if not run.evaluation:
        return _section("absent", title, _missing_evaluation(run))
    absent = [r for r in _rows(run) if not r["present_in_truth"]]
    if not absent:
        return _section("absent", title, _note("No organ is absent in the evaluated cases."))
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for row in absent:
        by_reason.setdefault(_absence_reason(run, row["case"], row["structure"]), []).append(row)
    summary_rows = []
    for reason, members in by_reason.items():
        volumes = [m["false_positive_ml"] for m in members]
        summary_rows.append(
            [
                reason,
                len(members),
                sum(v > 0 for v in volumes),
                f"{statistics.mean(volumes):.2f}",
                f"{max(volumes):.2f}",
                f"{sum(not _decision(run, m) for m in members)} of {len(members)}",
            ]
        )
    detail = [
        [
            r["case"],
            r["structure"],
            _absence_reason(run, r["case"], r["structure"]),
            _fmt(r["presence_probability"]),
            "present" if _decision(run, r) else "absent",
            f"{r['false_positive_ml']:.2f}",
        ]
        for r in absent
    ]
    classes = ["bad" if r["false_positive_ml"] > 0 or _decision(run, r) else "good" for r in absent]
    entries = [
        (f"{r['case']} {r['structure']}", _absence_reason(run, r["case"], r["structure"]), r["false_positive_ml"])
        for r in absent
    ]
    return _section(
        "absent",
        title,
        _table(
            ["scenario", "absent organ-cases", "painted (> 0 mL)", "mean mL", "max mL", "judged absent"], summary_rows
        ),
        '<div class="row"><div>',
        _table(
            ["case", "organ", "why absent", "presence probability", "decision", "false-positive mL"], detail, classes
        ),
        "</div><div>",
        _img(plot_absent_false_positives(entries), "false-positive volume on absent organs")
        if any(volume > 0 for _, _, volume in entries)
        else _note("No absent organ was painted: every false-positive volume is 0 mL."),
        "</div></div>",
    )


def _label_path(run: _Run, case: str) -> Path | None:
    if run.truth_dir is None:
        return None
    for candidate in (run.truth_dir / "labelsTr" / f"{case}.nii.gz", run.truth_dir / f"{case}.nii.gz"):
        if candidate.is_file():
            return candidate
    return None


def _image_path(run: _Run, case: str) -> Path | None:
    source = run.sidecars.get(case, {}).get("input", {}).get("path")
    if source and Path(source).exists():
        return Path(source)
    if run.truth_dir is not None:
        candidate = run.truth_dir / "imagesTr" / f"{case}_0000.nii.gz"
        return candidate if candidate.is_file() else None
    return None


def _chosen_cases(run: _Run) -> list[tuple[str, str, str | None]]:
    """Up to three (case, why shown, absent organ to centre on): one with an organ removed, the best and the worst."""
    rows = _rows(run)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    absent = [r for r in rows if not r["present_in_truth"]]
    removed = [r for r in absent if not _absence_reason(run, r["case"], r["structure"]).startswith(_OUT_OF_VIEW)]
    chosen: list[tuple[str, str, str | None]] = []
    if removed or absent:
        row = max(removed or absent, key=lambda r: r["false_positive_ml"])
        reason = _absence_reason(run, row["case"], row["structure"])
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


def _centre_point(run: _Run, truth: np.ndarray | None, prediction: np.ndarray, focus: str | None) -> list[float]:
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


def _case_table(run: _Run, case: str, truth: np.ndarray | None, voxel_ml: float) -> str:
    rows, classes = [], []
    sidecar = run.sidecars.get(case, {}).get("structures", {})
    scores = {r["structure"]: r for r in _rows(run) if r["case"] == case}
    for name, label in run.labels.items():
        entry = sidecar.get(name, {})
        score = scores.get(name)
        in_truth = score["present_in_truth"] if score else (truth is not None and bool((truth == label).any()))
        decided = entry.get("present")
        reason = _absence_reason(run, case, name)
        truth_text = (
            "present" if in_truth else "absent: " + ("out of view" if reason.startswith(_OUT_OF_VIEW) else reason)
        )
        decision = "n/a" if decided is None else ("present" if decided else "absent")
        true_ml = f"{float((truth == label).sum()) * voxel_ml:.1f}" if truth is not None else "n/a"
        rows.append(
            [
                name,
                truth_text,
                f"{decision} {_fmt(entry.get('probability'), 2)}",
                _fmt(entry.get("volume_ml"), 1),
                true_ml,
                _fmt(score["dice"] if score else None),
            ]
        )
        classes.append("" if decided is None else ("good" if bool(decided) == bool(in_truth) else "bad"))
    return _table(["organ", "truth", "decision (p)", "pred. mL", "true mL", "Dice"], rows, classes)


def _overlays(run: _Run) -> tuple[str, str, str]:
    title = "Slice overlays"
    if not run.sidecars:
        return _section("overlays", title, _note(f"No predictions in {run.predictions_dir}: nothing to overlay."))
    if not run.evaluation:
        return _section("overlays", title, _missing_evaluation(run))
    content = []
    for case, why, focus_name in _chosen_cases(run):
        image_path, prediction_path = _image_path(run, case), run.predictions_dir / f"{case}.nii.gz"
        if image_path is None or not prediction_path.is_file():
            content.append(_note(f"{case}: its image or prediction file is missing."))
            continue
        image = read_volume(image_path).reoriented("LPS")
        prediction = read_volume(prediction_path).reoriented("LPS").array
        label_path = _label_path(run, case)
        truth = read_volume(label_path).reoriented("LPS").array if label_path else None
        point = _centre_point(run, truth, prediction, focus_name if focus_name in run.labels else None)
        figure = plot_case_overlay(image.array, truth, prediction, image.spacing, [round(c) for c in point])
        content += [
            f"<h3>{html.escape(case)}: {html.escape(why)}</h3>",
            f'<div class="case">{_img(figure, f"overlay of {case}")}',
            f"<div>{_case_table(run, case, truth, image.voxel_volume_ml())}</div></div>",
        ]
    content.append(_note("Green rows: the presence decision agrees with the truth; red rows: it does not."))
    return _section("overlays", title, *content)


def _model_measurements(run: _Run) -> tuple[ModelMeasurements | None, str]:
    """The run's model (its config's overrides, its dataset's outputs) measured once, or why not."""
    if run.config is None or not run.labels:
        return None, "The model section needs the run's config.yaml and dataset.json."
    try:
        model = build_model_for_data(run.config, len(run.labels) + 1).eval()
        spec = get_model_spec(run.config.model.name)
    except MednetsError as error:
        return None, f"The run's model could not be built: {error}"
    grid = getattr(model, "grid_size", None) or (run.preprocessing or {}).get("patch_size") or spec.input_size
    shape = (1, spec.in_channels, *grid)
    return describe_model(model, spec.name, shape, description=spec.description), ""


def _model(run: _Run) -> tuple[str, str, str]:
    measured, why_not = _model_measurements(run)
    if measured is None:
        return _section("model", "Model", _note(why_not))
    images = {kind: figure_to_base64(figure) for kind, figure in model_figures(measured)}
    intro = _note(
        "The model report of `mednets report`, for this run's model (its overrides and output channels): "
        "the structure was measured by running the model once at its input size. Peak memory is measured by "
        f"`mednets report {measured.name} --input-size {' '.join(map(str, measured.input_shape[1:]))}` "
        "(the preset); the training's own seconds per step are above."
    )
    return _section("model", "Model", intro, render_html_sections(measured, images))


# ----------------------------------------------------------------------------------------------
# The page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1280px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .subtitle { color: #666; margin-top: 0; }
nav a { margin-right: 1rem; } section { border-top: 1px solid #ddd; margin-top: 1.5rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f3f7; } pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
img { max-width: 100%; } details { margin-bottom: 1rem; }
tr.good td { background: #eef8ee; } tr.bad td { background: #fbeaea; }
.note { color: #555; font-style: italic; }
.case { display: flex; gap: 1rem; align-items: flex-start; } .case img { width: 50%; }
.case > div { flex: 1; min-width: 0; overflow-x: auto; } .case table { font-size: 0.75rem; white-space: nowrap; }
.row { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.cards { display: flex; flex-wrap: wrap; gap: 1rem; margin: 1rem 0; }
.card { border: 1px solid #ccd6e0; border-radius: 6px; padding: 0.6rem 1rem; min-width: 9rem; background: #f7f9fc; }
.card .value { font-size: 1.5rem; font-weight: 600; } .card .label { color: #555; font-size: 0.85rem; }
"""


def write_run_report(
    run_dir: str | os.PathLike[str],
    *,
    predictions: str | os.PathLike[str] | None = None,
    scores: str | os.PathLike[str] | None = None,
    truth: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the run report of `run_dir` as one self-contained HTML file; returns its path.

    Args:
        run_dir: a run folder made by `mednets train` (and `mednets demo`).
        predictions: folder of `<case>.nii.gz` + `<case>.json` (default `<run>/test_predictions`).
        scores: `mednets evaluate` JSON (default `<run>/test_scores.json`).
        truth: dataset folder or folder of reference label maps (default: found through the sidecars).
        out: the HTML file (default `<run>/report.html`).

    Raises:
        InvalidInputError: `run_dir` is not a folder, or one of its JSON files is corrupt.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InvalidInputError(
            "run folder not found", source=str(run_dir), expected="a folder made by `mednets train`"
        )
    run = _load(run_dir, *(None if p is None else Path(p) for p in (predictions, scores, truth)))
    sections = [
        _what_was_run(run),
        _training(run),
        _dice(run),
        _presence(run),
        _absent(run),
        _overlays(run),
        _model(run),
    ]
    name = run.config.name if run.config else run_dir.name
    written = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    nav = "".join(f'<a href="#{anchor}">{html.escape(title)}</a>' for anchor, title, _ in sections)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>mednets run report: {html.escape(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>mednets run report: {html.escape(name)}</h1>"
        f'<p class="subtitle">{html.escape(str(run_dir))}, written {written}</p>'
        f"{_headline(run)}<nav>{nav}</nav>{''.join(body for _, _, body in sections)}</body></html>"
    )
    return atomic_write_text(Path(out) if out is not None else run_dir / REPORT_FILE, page)
