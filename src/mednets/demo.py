"""`mednets demo`: phantoms -> SADAAn training -> prediction of held-out cases -> evaluation -> run report.

This module sits above both `engine/` and `reports/` (it orchestrates them); only `mednets.cli`
imports it. The experiment lives in one config, `configs/sadaan_demo.yaml` (model, loss and the
training pace); `minutes` rescales its time budget and its step count together, so the learning
rate schedule still ends inside the budget. The output folder gets the run (checkpoints,
metrics.csv), `phantoms/{train,test}`, `test_predictions/`, `test_scores.{csv,json}`,
`timings.json` and `report.html`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mednets.atomic import atomic_write_text
from mednets.config import ExperimentConfig, load_config
from mednets.data.convert import ensure_phantom_datasets
from mednets.engine.api import load_run, predict_paths
from mednets.engine.evaluation import evaluate_folders, format_summary, write_evaluation
from mednets.engine.training import run_training
from mednets.errors import ConfigError, InvalidInputError
from mednets.reports.measure import machine_description
from mednets.reports.run_report import PREDICTIONS_DIR, SCORES_FILE, TIMINGS_FILE, write_run_report

__all__ = ["DEFAULT_CONFIG", "demo_config", "run_demo"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sadaan_demo.yaml"


def demo_config(
    config: str | os.PathLike[str] | None = None, *, minutes: float | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """The demo's experiment: `config` (default `configs/sadaan_demo.yaml`) with `overrides`, rescaled to `minutes`.

    Raises:
        ConfigError: the config is missing or invalid, or `minutes` is not positive.
    """
    path = Path(config) if config is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError("demo config not found", source=str(path), expected="a YAML file (pass --config)")
    experiment = load_config(path, list(overrides))
    if minutes is None:
        return experiment
    if minutes <= 0:
        raise ConfigError("must be positive", source="--minutes", got=minutes)
    train = experiment.train
    steps = train.max_steps
    if train.max_minutes:  # keep the config's pace: steps per minute
        steps = max(1, round(train.max_steps * minutes / train.max_minutes))
    return replace(experiment, train=replace(train, max_minutes=minutes, max_steps=steps))


def _prepare(out_dir: Path) -> None:
    """Start from an empty `out_dir`; a previous demo's output (it has timings.json) is replaced."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / TIMINGS_FILE).is_file():
            raise ConfigError(
                "output folder is not empty and holds no earlier demo", source=str(out_dir), expected="a new folder"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def run_demo(
    out_dir: str | os.PathLike[str] = "runs/demo",
    *,
    minutes: float | None = None,
    config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> Path:
    """Run the whole demo into `out_dir` and return the path of its `report.html`.

    Args:
        out_dir: output folder (created; an earlier demo there is replaced).
        minutes: training budget (default: the config's `train.max_minutes`).
        config: experiment YAML (default `configs/sadaan_demo.yaml`).
        overrides: `--set`-style overrides of the config, e.g. `["train.max_steps=2"]`.
        progress: show progress bars while training and predicting.
        echo: where stage headers and the summary are printed.
    """
    experiment = demo_config(config, minutes=minutes, overrides=overrides)
    out_dir = Path(out_dir).resolve()  # the sidecars record absolute image paths, so the report finds them
    _prepare(out_dir)
    timings: dict[str, Any] = {"machine": machine_description(), "stages": {}}
    atomic_write_text(out_dir / TIMINGS_FILE, json.dumps(timings, indent=2))  # marks the folder as the demo's
    phantoms = experiment.data.phantoms
    shape = "x".join(map(str, phantoms.shape))
    stages = [
        ("phantoms", f"generating {phantoms.n_train} training and {phantoms.n_test} held-out phantoms ({shape})"),
        ("training", f"training {experiment.model.name} for up to {experiment.train.max_minutes} min "
                     f"/ {experiment.train.max_steps} steps"),
        ("prediction", f"predicting the {phantoms.n_test} held-out phantoms"),
        ("evaluation", "scoring the predictions against the truth"),
        ("report", "writing report.html"),
    ]  # fmt: skip
    train_dir = test_dir = None
    report = out_dir / "report.html"
    for number, (stage, header) in enumerate(stages, start=1):
        echo(f"[{number}/{len(stages)}] {header}")
        start = time.perf_counter()
        if stage == "phantoms":
            train_dir, test_dir = ensure_phantom_datasets(out_dir / "phantoms", phantoms)
        elif stage == "training":
            run_training(experiment, out_dir, data_dir=train_dir, progress=progress)
        elif stage == "prediction":
            result = predict_paths(load_run(out_dir), [test_dir / "imagesTr"], out_dir / PREDICTIONS_DIR,
                                   progress=progress)  # fmt: skip
            if result["failed"]:
                path, message = result["failed"][0]
                raise InvalidInputError("a held-out case could not be predicted", source=path, got=message)
        elif stage == "evaluation":
            evaluation = evaluate_folders(out_dir / PREDICTIONS_DIR, test_dir)
            write_evaluation(evaluation, out_dir / Path(SCORES_FILE).stem)
            for label, value in format_summary(evaluation.summary):
                echo(f"      {label}: {value}")
        else:
            report = write_run_report(out_dir)
        timings["stages"][stage] = round(time.perf_counter() - start, 1)
        atomic_write_text(out_dir / TIMINGS_FILE, json.dumps(timings, indent=2))
        echo(f"      {stage} done in {timings['stages'][stage]:.0f} s")
    total = sum(timings["stages"].values())
    echo(f"demo finished in {total / 60:.1f} min; open {report}")
    return report
