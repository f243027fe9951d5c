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

import datetime
import html
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from mednets.atomic import atomic_write_text, check_not_inputs
from mednets.engine.run import RunFolder
from mednets.errors import InvalidInputError, MednetsError
from mednets.models import get_model_spec
from mednets.models.base import input_channels
from mednets.reports.figures import figure_to_base64
from mednets.reports.html import RUN_CSS, fmt, image, note, page, section, table
from mednets.reports.measure import machine_description
from mednets.reports.model_report import ModelMeasurements, describe_model, model_figures, render_html_sections
from mednets.reports.run_data import (
    PREDICTIONS_DIR,
    SCORES_FILE,
    TIMINGS_FILE,
    RunData,
    absence_reason,
    decision,
    evaluation_rows,
    load_run_data,
    missing_evaluation,
)
from mednets.reports.run_figures import (
    plot_absent_false_positives,
    plot_calibration,
    plot_dice_per_structure,
    plot_presence_confusion,
    plot_training_curves,
)
from mednets.reports.run_overlays import overlays_section

__all__ = ["PREDICTIONS_DIR", "SCORES_FILE", "TIMINGS_FILE", "REPORT_FILE", "write_run_report"]

REPORT_FILE = "report.html"


# ----------------------------------------------------------------------------------------------
# Sections


def _headline(run: RunData) -> str:
    cards = []
    summary = (run.evaluation or {}).get("summary")
    if summary:
        fp = summary["false_positive_ml"]
        cards += [
            ("Dice, present organs", fmt(summary["dice"])),
            ("presence accuracy", fmt(summary["presence"]["accuracy"])),
            ("absent organs painted", f"{fp['hallucinated']} of {summary['absent_structures']}"),
            ("test cases", str(summary["cases"])),
        ]
    if run.metrics:
        cards.append(("training steps", f"{max(r.get('step', 0) for r in run.metrics):.0f}"))
    if run.trainer_state:
        cards.append(("training time", f"{run.trainer_state['elapsed_seconds'] / 60:.1f} min"))
    if not cards:
        return note("This run has neither metrics nor an evaluation yet.")
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="value">{html.escape(v)}</div><div class="label">{html.escape(k)}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )


def _what_was_run(run: RunData) -> tuple[str, str, str]:
    rows: list[tuple[str, str]] = [("run folder", str(run.run_dir))]
    if run.config is not None:
        model = run.config.model
        rows.append(("model", model.name + (f" with {model.overrides}" if model.overrides else "")))
        train = run.config.train
        rows.append(
            (
                "training settings",
                f"batch {train.batch_size}, lr {train.lr:g}, up to {train.max_steps} steps"
                f" / {fmt(train.max_minutes, 1)} min, {train.precision}",
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
        absent = [r for r in evaluation_rows(run) if not r["present_in_truth"]]
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
                f"({run.config.train.best_metric if run.config else 'metric'} {fmt(state['best_value'])})",
            )
        )
    metrics_file = run.run_dir / "metrics.csv"
    if metrics_file.is_file():
        finished = datetime.datetime.fromtimestamp(metrics_file.stat().st_mtime).astimezone()
        rows.append(("training finished", finished.isoformat(timespec="seconds")))
    machine = (run.timings or {}).get("machine")
    rows.append(("machine", machine or f"{machine_description()} (where this report was written)"))
    content = [table(["what", "value"], rows)]
    stages = (run.timings or {}).get("stages", {})
    if stages:
        total = sum(stages.values())
        content.append("<h3>Wall time by stage</h3>")
        content.append(
            table(
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
        content.append(note(f"No config.yaml in {run.run_dir}: this folder was not made by `mednets train`."))
    return section("run", "What was run", *content)


def _series(rows: list[dict[str, float]], prefix: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and math.isfinite(value):
                steps, values = out.setdefault(key[len(prefix) :], ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def _training(run: RunData) -> tuple[str, str, str]:
    if not run.metrics:
        return section("training", "Training", note(f"No metrics.csv in {run.run_dir}: no training curves."))
    train = _series(run.metrics, "train/")
    validation = _series(run.metrics, "val/")
    shown = {k: v for k, v in validation.items() if k in ("dice", "presence_accuracy", "loss")}
    best_step = (run.trainer_state or {}).get("best_step")
    content = [image(plot_training_curves(train, shown, best_step=best_step), "training curves")]
    if validation:
        last = {k: v[1][-1] for k, v in validation.items()}
        step = validation[next(iter(validation))][0][-1]
        content.append(f"<h3>Last validation (step {step:.0f})</h3>")
        content.append(table(list(last), [[fmt(v) for v in last.values()]]))
    else:
        content.append(note("No validation ran yet."))
    return section("training", "Training", *content)


def _dice(run: RunData) -> tuple[str, str, str]:
    if not run.evaluation:
        return section("dice", "Dice per organ", missing_evaluation(run))
    summary = run.evaluation["summary"]
    per = summary["per_structure"]
    rows = [
        [name, fmt(s["dice"]), fmt(s["hd95_mm"], 1), fmt(s["nsd"]), s["cases_present"], s["cases_absent"]]
        for name, s in per.items()
    ]
    rows.append(["all present organs", fmt(summary["dice"]), fmt(summary["hd95_mm"], 1), fmt(summary["nsd"]), "", ""])
    return section(
        "dice",
        "Dice per organ",
        '<div class="row"><div>',
        table(["organ", "Dice", "HD95 mm", "NSD", "cases present", "cases absent"], rows),
        "</div><div>",
        image(plot_dice_per_structure({name: s["dice"] for name, s in per.items()}), "Dice per organ"),
        "</div></div>",
        note("Dice, HD95 and NSD are over the cases where the organ is present; absent organs are scored below."),
    )


def _calibration_table(run: RunData) -> list[str]:
    """The presence calibration fitted on the validation cases, if the run has one."""
    calibration = run.calibration
    if not calibration:
        return []
    fitted = calibration.get("fitted_on", {})
    temperatures = calibration["temperatures"]
    return [
        table(
            [
                "validation cases",
                "absent pairs",
                "ECE before",
                "ECE after",
                "threshold",
                "volume floor",
                "temperatures (min-max)",
            ],
            [
                [
                    fitted.get("validation_cases"),
                    fitted.get("absent_pairs"),
                    fmt(fitted.get("ece_before")),
                    fmt(fitted.get("ece_after")),
                    fmt(calibration["threshold"]),
                    fmt(calibration.get("volume_floor_fraction")),
                    f"{min(temperatures):.2f}-{max(temperatures):.2f}",
                ]
            ],
        ),
        note(
            "Presence calibration, fitted on the validation cases after training (never on test data): the "
            "sidecars' probabilities are sigmoid(logit / temperature); a structure is called present at or above "
            "the threshold and emptied when painted with less than the floor times its smallest training volume."
        ),
    ]


def _presence(run: RunData) -> tuple[str, str, str]:
    if not run.evaluation:
        return section("presence", "Presence detection", missing_evaluation(run))
    rows = evaluation_rows(run)
    counts = np.zeros((2, 2), dtype=int)
    for row in rows:
        counts[0 if row["present_in_truth"] else 1, 0 if decision(run, row) else 1] += 1
    metrics = run.evaluation["summary"]["presence"]
    from_mask = any(
        entry.get("presence_source") == "mask"
        for sidecar in run.sidecars.values()
        for entry in sidecar.get("structures", {}).values()
    )
    content = [
        table(
            ["accuracy", "precision", "recall", "F1", "AUROC", "ECE"],
            [[fmt(metrics[k]) for k in ("accuracy", "precision", "recall", "f1", "auroc", "ece")]],
        ),
        '<div class="row"><div>',
        image(plot_presence_confusion(counts), "presence confusion matrix"),
        "</div><div>",
        image(
            plot_calibration([r["presence_probability"] for r in rows], [r["present_in_truth"] for r in rows]),
            "presence calibration",
        ),
        "</div></div>",
        *_calibration_table(run),
        note(
            "The confusion matrix and accuracy, precision, recall and F1 count the model's decisions (the "
            "sidecars' present flags); AUROC and ECE score its presence probabilities. The reliability diagram "
            "bins them against how often the structure was there."
            + (
                " This model has no presence head: presence is read from its masks (probability 0 or 1)."
                if from_mask
                else ""
            )
        ),
    ]
    return section("presence", "Presence detection", *content)


def _absent(run: RunData) -> tuple[str, str, str]:
    title = "Absent organs: false-positive volume by scenario"
    if not run.evaluation:
        return section("absent", title, missing_evaluation(run))
    absent = [r for r in evaluation_rows(run) if not r["present_in_truth"]]
    if not absent:
        return section("absent", title, note("No organ is absent in the evaluated cases."))
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for row in absent:
        by_reason.setdefault(absence_reason(run, row["case"], row["structure"]), []).append(row)
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
                f"{sum(not decision(run, m) for m in members)} of {len(members)}",
            ]
        )
    detail = [
        [
            r["case"],
            r["structure"],
            absence_reason(run, r["case"], r["structure"]),
            fmt(r["presence_probability"]),
            "present" if decision(run, r) else "absent",
            f"{r['false_positive_ml']:.2f}",
        ]
        for r in absent
    ]
    classes = ["bad" if r["false_positive_ml"] > 0 or decision(run, r) else "good" for r in absent]
    entries = [
        (f"{r['case']} {r['structure']}", absence_reason(run, r["case"], r["structure"]), r["false_positive_ml"])
        for r in absent
    ]
    return section(
        "absent",
        title,
        table(
            ["scenario", "absent organ-cases", "painted (> 0 mL)", "mean mL", "max mL", "judged absent"], summary_rows
        ),
        '<div class="row"><div>',
        table(
            ["case", "organ", "why absent", "presence probability", "decision", "false-positive mL"], detail, classes
        ),
        "</div><div>",
        image(plot_absent_false_positives(entries), "false-positive volume on absent organs")
        if any(volume > 0 for _, _, volume in entries)
        else note("No absent organ was painted: every false-positive volume is 0 mL."),
        "</div></div>",
    )


def _model_measurements(run: RunData) -> tuple[ModelMeasurements | None, str]:
    """The run's model (its config's overrides, its dataset's outputs) measured once, or why not."""
    if run.config is None or not run.labels:
        return None, "The model section needs the run's config.yaml and dataset.json."
    try:
        folder = RunFolder(run.run_dir)
        model = folder.build_model().eval()
        spec = get_model_spec(run.config.model.name)
        shape = (1, input_channels(model), *(folder.preprocessing.window or spec.input_size))
        return describe_model(model, spec.name, shape, description=spec.description), ""
    except MednetsError as error:
        return None, f"The run's model could not be built and measured: {error}"


def _model(run: RunData) -> tuple[str, str, str]:
    measured, why_not = _model_measurements(run)
    if measured is None:
        return section("model", "Model", note(why_not))
    images = {kind: figure_to_base64(figure) for kind, figure in model_figures(measured)}
    intro = note(
        "The model report of `mednets report`, for this run's model (its overrides and output channels): "
        "the structure was measured by running the model once at its input size. Peak memory is measured by "
        f"`mednets report {measured.name} --input-size {' '.join(map(str, measured.input_shape[1:]))}` "
        "(the preset); the training's own seconds per step are above."
    )
    return section("model", "Model", intro, render_html_sections(measured, images))


# ----------------------------------------------------------------------------------------------
# The page


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
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    check_not_inputs([out], [*RunFolder(run_dir).run_files(), predictions, scores, truth], "--out")
    run = load_run_data(run_dir, *(None if p is None else Path(p) for p in (predictions, scores, truth)))
    sections = [
        _what_was_run(run),
        _training(run),
        _dice(run),
        _presence(run),
        _absent(run),
        overlays_section(run),
        _model(run),
    ]
    name = run.config.name if run.config else run_dir.name
    written = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    nav = "".join(f'<a href="#{anchor}">{html.escape(title)}</a>' for anchor, title, _ in sections)
    body = (
        f"<h1>mednets run report: {html.escape(name)}</h1>"
        f'<p class="subtitle">{html.escape(str(run_dir))}, written {written}</p>'
        f"{_headline(run)}<nav>{nav}</nav>{''.join(content for _, _, content in sections)}"
    )
    document = page(f"mednets run report: {name}", RUN_CSS, body)
    return atomic_write_text(out, document)
