"""UNet (seed 004): seed parameter counts, odd input sizes, 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from mednets.errors import InvalidInputError
from mednets.models import create_model


@pytest.mark.parametrize(("bilinear", "expected"), [(False, 31_037_633), (True, 17_262_977)])
def test_seed_parameter_counts(bilinear: bool, expected: int) -> None:
    model = create_model("unet", in_channels=3, out_channels=1, bilinear=bilinear)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("bilinear", [False, True])
def test_odd_2d_size_returns_input_size(bilinear: bool) -> None:
    # The padding logic does not depend on the width, so a narrow UNet keeps the test fast.
    model = create_model("unet", in_channels=3, out_channels=2, bilinear=bilinear, base_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 257, 301))
    assert out.shape == (1, 2, 257, 301)


@pytest.mark.parametrize("bilinear", [False, True])
def test_odd_3d_size_returns_input_size(bilinear: bool) -> None:
    model = create_model("unet3d", in_channels=1, out_channels=3, bilinear=bilinear, base_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 33, 47, 51))
    assert out.shape == (1, 3, 33, 47, 51)


def test_wrong_channel_count_names_the_expectation() -> None:
    model = create_model("unet", in_channels=3, base_channels=4)
    with pytest.raises(InvalidInputError, match=r"expected 3 channels"):
        model(torch.randn(1, 1, 32, 32))


def test_2d_model_rejects_a_volume() -> None:
    model = create_model("unet", base_channels=4)
    with pytest.raises(InvalidInputError, match=r"expected 4 axes \[B, C, H, W\]"):
        model(torch.randn(1, 3, 8, 32, 32))


def test_checkpointing_trains_to_the_same_parameters() -> None:
    """Two SGD steps with and without checkpointing end at the same weights and batch-norm statistics."""
    torch.manual_seed(0)
    plain = create_model("unet", base_channels=4).double()
    checkpointed = create_model("unet", base_channels=4).double()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_gradient_checkpointing(True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for model in (plain, checkpointed):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)
