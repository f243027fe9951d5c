"""The training-memory split: activations counted per stage by hand, the parts against the measured tensor peak."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mednets.models import create_model, get_model_spec
from mednets.reports.training_memory import SPLIT_TOLERANCE, saved_activation_bytes, training_memory

MB = 2**20


def test_saved_activations_are_counted_per_stage_without_the_weights() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    # Linear saves its input (2x4 floats; its weight is a parameter, not counted), ReLU its output
    # (2x8), the last Linear its input: the ReLU's output, already counted once.
    assert saved_activation_bytes(model, torch.randn(2, 4)) == [("0", 2 * 4 * 4), ("1", 2 * 8 * 4)]


def test_a_wrapper_is_split_by_the_stages_inside_it() -> None:
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    stages = [name for name, _ in saved_activation_bytes(nn.Sequential(inner), torch.randn(1, 4))]
    assert stages == ["0.0", "0.1"]


@pytest.mark.parametrize("name", ["unet", "unet3d", "sadaan", "histo_autoencoder", "dynunet"])
def test_the_parts_sum_to_the_measured_peak_of_a_training_step(name: str) -> None:
    spec = get_model_spec(name)
    model = create_model(name, **{**spec.tiny_overrides, **({"base_channels": 8} if name == "unet" else {})})
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    memory = training_memory(model, torch.randn(2, spec.in_channels, *spec.tiny_input_size))
    assert memory.weights_mb == pytest.approx((params * 4 + buffers) / MB)
    assert memory.gradients_mb == pytest.approx(params * 4 / MB) and memory.optimizer_mb == 2 * memory.gradients_mb
    stages = {stage.split(".")[0] for stage, _ in memory.activations}  # DynUNet's are `net.*`: it wraps MONAI's
    assert stages and stages <= {*(child for child, _ in model.named_children()), "(model's own operations)"}
    assert memory.activations_mb > 0
    parts = memory.weights_mb + memory.gradients_mb + memory.optimizer_mb + memory.activations_mb
    assert memory.total_mb == pytest.approx(parts)
    assert abs(memory.measured_peak_mb / memory.total_mb - 1) <= SPLIT_TOLERANCE and memory.within_tolerance
    assert memory.rows()[-1][0].startswith("Measured peak of live tensors")
