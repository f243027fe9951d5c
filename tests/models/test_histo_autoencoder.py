"""Histopathology autoencoders (seed 001): the seed's layer tables, counts and output range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mednets.errors import InvalidInputError
from mednets.models import create_model
from mednets.reports.model_report import trace_layers

SEED_TABLE_ROW = re.compile(r"^(\S+)\s+(\w+)\s+\[\(.*?\)\]\s+\(([\d, ]+)\)\s+(\d+)\s*$")


def seed_layer_table(seed_text: str, model_type: str) -> list[tuple[str, str, tuple[int, ...], int]]:
    """Rows (name, type, output shape, params) of the seed's layer table for `model_type`."""
    section = seed_text.split(f"Model Type: {model_type}\n", 1)[1].split("Estimated Forward Pass Memory", 1)[0]
    rows = []
    for line in section.splitlines():
        match = SEED_TABLE_ROW.match(line)
        if match:
            name, kind, shape, params = match.groups()
            rows.append((name, kind, tuple(int(s) for s in shape.split(",")), int(params)))
    return rows


def traced_table(name: str) -> list[tuple[str, str, tuple[int, ...], int]]:
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = create_model(name).eval()
        layers, _ = trace_layers(model, torch.empty(1, 3, 256, 256))
    return [(r.name, r.type, r.output_shape, r.params) for r in layers]


@pytest.mark.parametrize(
    ("name", "model_type", "rows"),
    [("histo_autoencoder", "HistoAutoencoder", 63), ("deep_histo_autoencoder", "DeepHistoAutoencoder", 92)],
)
def test_layer_table_matches_the_seed(shared_dir: Path, name: str, model_type: str, rows: int) -> None:
    seed = next((shared_dir / "seeds").glob("001_*.txt")).read_text(encoding="utf-8")
    expected = seed_layer_table(seed, model_type)
    assert len(expected) == rows  # the parser read the whole seed table
    assert traced_table(name) == expected


def test_key_shapes_without_the_seed_file() -> None:
    table = {row[0]: row for row in traced_table("histo_autoencoder")}
    assert table["decoder3.0"][1:] == ("ConvTranspose2d", (1, 256, 64, 64), 3_145_984)
    assert table["final.4"][1:3] == ("Sigmoid", (1, 3, 256, 256))
    deep = {row[0]: row for row in traced_table("deep_histo_autoencoder")}
    assert deep["initial.0"][1:] == ("Conv2d", (1, 64, 256, 256), 9_472)
    assert deep["decoder3.0"][1:] == ("ConvTranspose2d", (1, 256, 64, 64), 4_194_560)


@pytest.mark.parametrize(
    ("name", "expected"), [("histo_autoencoder", 34_544_963), ("deep_histo_autoencoder", 133_288_259)]
)
def test_seed_parameter_counts(name: str, expected: int) -> None:
    assert sum(p.numel() for p in create_model(name).parameters()) == expected


@pytest.mark.parametrize("name", ["histo_autoencoder", "deep_histo_autoencoder"])
def test_output_is_an_image_in_unit_range(name: str) -> None:
    model = create_model(name, base_channels=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 80) * 10)
    assert out.shape == (2, 3, 64, 80)
    assert out.min() >= 0 and out.max() <= 1


def test_size_not_divisible_by_16_is_rejected() -> None:
    model = create_model("histo_autoencoder", base_channels=8)
    with pytest.raises(InvalidInputError, match="divisible by 16"):
        model(torch.rand(1, 3, 64, 72))
