"""`denoise_array`'s options: the mean colour kept tile by tile, the strength (fixed or from the noise estimate)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mednets.engine.denoise import denoise_array, with_input_mean_colour
from mednets.errors import ConfigError

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


def test_the_noise_estimate_finds_the_gaussian_sigma_as_scikit_image_does() -> None:
    from skimage.restoration import estimate_sigma

    from mednets.engine.denoise import estimate_noise_sigma

    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 3, 128), torch.linspace(0, 3, 128), indexing="ij")
    smooth = (0.5 + 0.2 * torch.sin(y) * torch.cos(x)).expand(3, 128, 128)  # structure without fine detail
    for sigma in (0.02, 0.05, 0.1):
        noisy = smooth + sigma * torch.randn(3, 128, 128)
        estimate = float(estimate_noise_sigma(noisy[None])[0])
        reference = float(estimate_sigma(noisy.permute(1, 2, 0).numpy(), channel_axis=-1, average_sigmas=True))
        assert abs(estimate - sigma) < 0.05 * sigma and abs(estimate - reference) < 0.05 * sigma


def test_strength_blends_the_input_and_the_model_output() -> None:
    torch.manual_seed(0)
    image = 0.2 + 0.6 * torch.rand(3, 64, 64)
    model = _ColourCast().eval()
    for strength in (0.0, 0.5, 1.0):
        out = denoise_array(model, image, patch_size=32, overlap=0.25, precision="fp32", strength=strength)
        torch.testing.assert_close(out, image + strength * CAST[0], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="strength"):
        denoise_array(model, image, patch_size=32, precision="fp32", strength=-1.0)


def test_auto_strength_keeps_a_noise_remover_and_scales_back_a_detail_remover() -> None:
    from mednets.engine.denoise import with_strength

    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 3, 64), indexing="ij")
    clean = (0.5 + 0.2 * torch.sin(y) * torch.cos(x)).expand(1, 3, 64, 64)
    noisy = clean + 0.05 * torch.randn(1, 3, 64, 64)
    exact = with_strength(lambda tiles: clean, noisy, "auto")  # removes the noise alone: kept whole
    torch.testing.assert_close(exact, clean, rtol=0, atol=0.01)
    flat = with_strength(lambda tiles: torch.full_like(tiles, 0.5), noisy, "auto")  # removes the image too
    removed_share = float((noisy - flat).std() / (noisy - 0.5).std())
    assert 0.2 < removed_share < 0.6  # scaled back to about the noise: sigma 0.05 of a 0.1-std difference


def test_a_given_noise_sigma_replaces_the_estimate_and_needs_the_automatic_strength() -> None:
    from mednets.engine.denoise import with_strength

    torch.manual_seed(0)
    noisy = 0.5 + 0.1 * torch.randn(2, 3, 32, 32)
    flat = torch.full_like(noisy, 0.5)  # removes the noise, std about 0.1
    removed = flat - noisy
    scale = 0.05 / removed.flatten(1).std(dim=1)  # told sigma 0.05: about half of it is removed
    expected = noisy + scale.view(2, 1, 1, 1) * removed
    torch.testing.assert_close(with_strength(lambda tiles: flat, noisy, "auto", noise_sigma=0.05), expected)
    with pytest.raises(ConfigError, match="automatic strength only"):
        denoise_array(_ColourCast().eval(), noisy[0].clamp(0, 1), patch_size=32, precision="fp32", noise_sigma=0.05)
