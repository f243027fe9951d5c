"""`denoise_array(keep_mean_colour=True)`: a colour cast the model adds is taken out, tile by tile."""

from __future__ import annotations

import torch
from torch import nn

from mednets.engine.denoise import denoise_array, with_input_mean_colour

CAST = torch.tensor([0.08, -0.05, 0.12]).view(1, 3, 1, 1)


class _ColourCast(nn.Module):
    """A "denoiser" that returns its input with a colour cast: what a model trained on other stains does."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # denoise_array reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + CAST.to(x)


def test_keeping_the_mean_colour_removes_a_cast_across_tiles() -> None:
    torch.manual_seed(0)
    image = 0.2 + 0.6 * torch.rand(3, 80, 72)  # several tiles; no clamping at 0 or 1
    model = _ColourCast().eval()
    cast = denoise_array(model, image, patch_size=32, overlap=0.375, precision="fp32")
    kept = denoise_array(model, image, patch_size=32, overlap=0.375, precision="fp32", keep_mean_colour=True)
    torch.testing.assert_close(cast, image + CAST[0], rtol=0, atol=1e-5)  # without the option: the cast stays
    torch.testing.assert_close(kept, image, rtol=0, atol=1e-5)


def test_with_input_mean_colour_matches_each_tile_and_channel() -> None:
    torch.manual_seed(0)
    tiles = torch.rand(2, 3, 16, 16)
    out = with_input_mean_colour(lambda x: 0.5 * x.flip(-1) + 0.3, tiles)
    torch.testing.assert_close(out.mean(dim=(2, 3)), tiles.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    # the structure the model made is kept: only a constant per tile and channel moves
    expected = 0.5 * tiles.flip(-1)
    torch.testing.assert_close(out - out.mean(dim=(2, 3), keepdim=True),
                               expected - expected.mean(dim=(2, 3), keepdim=True), rtol=0, atol=1e-6)  # fmt: skip
