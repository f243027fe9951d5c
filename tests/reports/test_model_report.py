"""The measured model report: files, measured figures, comparison."""

from __future__ import annotations

from pathlib import Path

import pytest

from mednets.cli import main
from mednets.reports.model_report import measure_model, write_model_report


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_model_report(["histo_autoencoder", "unet"], (3, 32, 32), out, repeats=1)
    return out


def test_report_writes_markdown_html_and_figures(comparison: Path) -> None:
    html = (comparison / "report.html").read_text()
    markdown = (comparison / "report.md").read_text()
    assert html.count("data:image/png;base64,") == 4  # two figures per model, embedded
    assert "GFLOPs per forward pass" in html and "Peak memory, training step (MB, measured)" in html
    assert "## Comparison" in markdown and "34,544,963" in markdown and "31,037,633" in markdown
    assert sorted(p.name for p in (comparison / "figures").iterdir()) == [
        "histo_autoencoder_data_flow.png",
        "histo_autoencoder_parameters.png",
        "unet_data_flow.png",
        "unet_parameters.png",
    ]
    assert "ENCODER1: [B, 3, 32, 32] -> [B, 64, 16, 16]" in markdown


def test_measured_memory_grows_from_inference_to_training() -> None:
    m = measure_model("histo_autoencoder", (3, 32, 32), repeats=1)
    weights_mb = m.total_params * 4 / 2**20
    # Training holds weights, gradients and two Adam moments: at least 3x the weights on top of inference.
    assert m.inference_peak_mb > 0.9 * weights_mb
    assert m.train_peak_mb > m.inference_peak_mb + 2.5 * weights_mb
    assert m.flops > 0 and m.train_step_seconds > m.inference_seconds
    assert [g for g, _ in m.grouped_breakdown] == ["encoder", "bottleneck", "decoder", "final"]


def test_cli_report_for_one_model(tmp_path: Path) -> None:
    code = main(["report", "unet", "--input-size", "3", "32", "32", "--out", str(tmp_path), "--repeats", "1"])
    assert code == 0
    assert (tmp_path / "report.html").stat().st_size > 10_000
