"""The run report: sections, embedded images, notes for missing parts, and the page as Chromium shows it."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mednets.cli import main
from mednets.demo import run_demo
from mednets.reports.browser import check_page, find_chromium, screenshot
from mednets.reports.run_report import write_run_report

TINY_DEMO = [
    "model.overrides={grid_size: [16, 16, 16], base_channels: 4, feature_channels: 8}",
    # Test seed 1 draws a left nephrectomy for case 3: the report has an organ removed to show.
    "data.phantoms={n_train: 4, n_test: 4, shape: [32, 32, 32], seed: 0}",
    "data.val_fraction=0.25",
    "train.max_steps=3",
    "train.val_every=2",
]
SECTIONS = ("run", "training", "dice", "presence", "absent", "overlays", "model")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo end to end at toy size: 4 + 4 phantoms at 32³, a 16³ SADAAn trained for 3 steps."""
    out = tmp_path_factory.mktemp("demo") / "run"
    lines: list[str] = []
    run_demo(out, overrides=TINY_DEMO, progress=False, echo=lines.append)
    assert [line.split("]")[0] for line in lines if line.startswith("[")] == [f"[{i}/5" for i in range(1, 6)]
    return out


def _images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def _expected_images(run: Path) -> int:
    """Curves, Dice, confusion, calibration, three overlays, parameters, data flow; plus the absent-organ
    volume chart when some absent organ was painted (else a note says none was)."""
    rows = json.loads((run / "test_scores.json").read_text(encoding="utf-8"))["rows"]
    return 9 + any(r["false_positive_ml"] > 0 for r in rows if not r["present_in_truth"])


def test_demo_writes_run_predictions_scores_timings_and_report(demo_run: Path) -> None:
    for name in ("config.yaml", "metrics.csv", "test_scores.json", "test_scores.csv", "report.html"):
        assert (demo_run / name).is_file(), name
    assert len(list((demo_run / "test_predictions").glob("*.nii.gz"))) == 4
    timings = json.loads((demo_run / "timings.json").read_text(encoding="utf-8"))
    assert list(timings["stages"]) == ["phantoms", "training", "prediction", "evaluation", "report"]
    assert "cores" in timings["machine"]


def test_report_has_every_section_with_images_embedded(demo_run: Path) -> None:
    page = (demo_run / "report.html").read_text(encoding="utf-8")
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    images = _images(page)
    assert len(images) == _expected_images(demo_run)
    assert all(src.startswith("data:image/png;base64,") for src in images)  # self-contained
    assert "left nephrectomy" in page  # the scenario of the removed organ, from the test set's dataset.json
    assert "SpatialAttentionMedicalSegmenter" in page and "Parameter breakdown by stage" in page
    assert "Wall time by stage" in page
    assert not any(missing in page for missing in ("No evaluation", "No predictions", "No metrics", "No config"))


def test_report_without_evaluation_or_predictions_says_so(demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("test_scores.*", "test_predictions", "report.html"))
    page = write_run_report(run).read_text(encoding="utf-8")
    assert "No evaluation in" in page and "No predictions in" in page
    assert len(_images(page)) == 3  # training curves and the model's two figures
    empty = tmp_path / "empty"
    empty.mkdir()
    page = html.unescape(write_run_report(empty).read_text(encoding="utf-8"))
    assert "No config.yaml" in page and "No metrics.csv" in page and "needs the run's config.yaml" in page


def test_cli_report_run_writes_elsewhere(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.html"
    assert main(["report-run", "--run", str(demo_run), "--out", str(out)]) == 0
    assert len(_images(out.read_text(encoding="utf-8"))) == _expected_images(demo_run)
    assert main(["report-run", "--run", str(tmp_path / "missing")]) == 2


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(demo_run: Path, tmp_path: Path) -> None:
    check = check_page(demo_run / "report.html")
    assert check.images == _expected_images(demo_run) and check.broken == []  # every image decoded: naturalWidth > 0
    assert check.text_length > 2000 and check.height > 3000
    png = screenshot(demo_run / "report.html", tmp_path / "report.png", height=1600)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1280)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20  # not a blank page: text, tables, a figure
