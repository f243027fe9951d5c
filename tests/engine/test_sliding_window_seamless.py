"""Seamless sliding windows: no seams, equal to whole-image inference for local models, any image size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mednets.engine.sliding_window import seamless_window, sliding_window, window_starts
from mednets.errors import ConfigError


def _local_model(padding_mode: str = "zeros") -> nn.Module:
    """Three 3x3 convolutions: each output pixel sees 3 pixels around it (receptive-field radius 3)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), nn.Tanh(),
              nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode), nn.Tanh(),
              nn.Conv2d(8, 2, 3, padding=1, padding_mode=padding_mode), nn.Sigmoid()]  # fmt: skip
    return nn.Sequential(*layers).eval()


def _seamless(model: nn.Module, image: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Windows of 64 overlapping by 24 pixels (margin 6: beyond the model's receptive-field radius 3), fp32."""
    return sliding_window(model, image, (64, 64), overlap=0.375, weights="seamless", size_multiple=16,
                          batch_size=batch_size, precision="fp32")  # fmt: skip


def test_neighbouring_windows_sum_to_one_over_the_overlap() -> None:
    tile, overlap, margin = 64, 24, 4
    first = seamless_window(tile, margin, overlap - 2 * margin, first=True, last=False)
    second = seamless_window(tile, margin, overlap - 2 * margin, first=False, last=True)
    shared = first[tile - overlap :] + second[:overlap]
    torch.testing.assert_close(shared, torch.ones(overlap))
    assert first[:margin].eq(1).all() and first[-margin:].eq(0).all()  # no ramp at the image edge


def test_windows_cover_the_image_and_end_at_its_edge() -> None:
    assert window_starts(300, 128, 0.25) == [0, 96, 172]
    assert window_starts(100, 128, 0.25) == [0]


def test_constant_image_stays_constant_across_tile_borders() -> None:
    model = _local_model(padding_mode="replicate")  # a constant image gives a constant output
    image = torch.full((3, 150, 211), 0.3)
    with torch.no_grad():
        expected = model(image[None])[0, :, 0, 0]
        out = _seamless(model, image)
    assert out.shape == (2, 150, 211)
    torch.testing.assert_close(out, expected[:, None, None].expand_as(out), atol=1e-6, rtol=0)


def test_random_image_equals_whole_image_inference() -> None:
    model = _local_model()
    torch.manual_seed(1)
    image = torch.rand(3, 176, 208)
    with torch.no_grad():
        whole = model(image[None])[0]
        tiled = _seamless(model, image, batch_size=3)
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert (tiled[inner] - whole[inner]).abs().max() < 1e-4
    assert (tiled - whole).abs().max() < 1e-4  # tiles share the image's own edges too


def test_images_smaller_than_a_tile_are_padded_and_cropped_back() -> None:
    model = _local_model()
    with torch.no_grad():
        out = _seamless(model, torch.rand(3, 21, 37))
    assert out.shape == (2, 21, 37) and torch.isfinite(out).all()


def test_bad_weighting_is_rejected() -> None:
    with pytest.raises(ConfigError, match="weights one of"):
        sliding_window(_local_model(), torch.rand(3, 64, 64), (64, 64), weights="triangle")
