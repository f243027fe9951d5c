"""The measured model report: files, measured figures, comparison, any build (overrides), header, memory split."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from mednets.cli import main
from mednets.config import yaml_values
from mednets.errors import ConfigError, UnknownNameError
from mednets.models import create_model, get_model_spec
from mednets.reports import model_report
from mednets.reports.measure import Measured
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


def _in_process(fn: Callable[..., Any], *args: Any, device: str = "cpu", threads: int | None = None) -> Measured:
    """`run_measured` without the child process (seconds instead of a torch start-up per pass); no peak."""
    return Measured(fn(*args), 0.0, device)


@pytest.fixture(scope="module")
def bilinear_unet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The report of `unet` with `bilinear=true`, passes measured in this process."""
    out = tmp_path_factory.mktemp("bilinear")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_report, "run_measured", _in_process)
        write_model_report(["unet"], (3, 32, 32), out, repeats=1, overrides={"bilinear": "true"})
    return (out / "report.md").read_text()


def test_overrides_reach_the_measured_model(bilinear_unet: str) -> None:
    built = sum(p.numel() for p in create_model("unet", bilinear=True).parameters())
    assert built != get_model_spec("unet").param_count
    assert f"| Total parameters | {built:,} |" in bilinear_unet
    assert "| Constructor overrides | bilinear=True |" in bilinear_unet
    assert "- Constructor overrides: unet: bilinear=True" in bilinear_unet


def test_report_header_says_when_and_where(bilinear_unet: str) -> None:
    header = dict(line[2:].split(": ", 1) for line in bilinear_unet.splitlines() if line.startswith("- "))
    generated = datetime.fromisoformat(header["Generated"])
    assert generated.tzinfo is not None and abs(datetime.now(UTC) - generated) < timedelta(minutes=10)
    assert f"torch {torch.__version__}" in header["Machine"] and header["Device"] == "cpu"


def test_report_splits_the_training_memory(bilinear_unet: str) -> None:
    assert "### Training memory (one Adam step, fp32)" in bilinear_unet
    assert "| Optimizer state (Adam/AdamW: 2 moments, fp32) |" in bilinear_unet
    assert "### Activations saved for backward, per stage" in bilinear_unet and "| up4 |" in bilinear_unet
    assert "saved_tensors_hooks" in bilinear_unet  # the method is stated
    measured = next(line for line in bilinear_unet.splitlines() if line.startswith("| Measured peak of live tensors"))
    assert "(within +/-30% of the sum)" in measured


def test_an_unknown_override_is_refused_in_one_line_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_report, "run_measured", lambda *args, **kwargs: pytest.fail("measured"))
    with pytest.raises(ConfigError) as error:
        write_model_report(["unet", "sadaan"], (3, 32, 32), tmp_path, overrides={"bilinear": "true"})
    assert isinstance(error.value, UnknownNameError)
    message = str(error.value)
    assert "\n" not in message and "--set bilinear" in message and "'sadaan'" in message
    assert "grid_size" in message  # the valid options are listed


def test_a_thirteen_structure_sadaan_is_built_from_text_values() -> None:
    model = model_report._build(
        "sadaan", "cpu", False, yaml_values({"out_channels": "13", "grid_size": "[16, 16, 16]"})
    )
    assert model.num_structures == 13
