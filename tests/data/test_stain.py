"""Macenko stain normalisation: the stains of a synthetic H&E image are found, and the map inverts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mednets.data.stain import REFERENCE_MAX_CONCENTRATIONS, REFERENCE_STAINS, StainNormaliser
from mednets.engine.denoise import denoise_image, denoise_slide
from mednets.errors import ConfigError, InvalidInputError

# OD vectors of haematoxylin and eosin (columns), unlike the reference ones; eosin absorbs some red, so
# its pure pixels pass Macenko's OD threshold in every channel.
STAINS = np.array([[0.65, 0.25], [0.70, 0.90], [0.29, 0.36]])
STAINS = STAINS / np.linalg.norm(STAINS, axis=0)


def _synthetic_he(shape: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    """An image made of two stains, ``[3, H, W]`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    concentrations = rng.uniform(0.0, 1.0, (2, shape[0] * shape[1])) * np.array([[1.2], [0.8]])
    concentrations[:, ::7] = 0.0  # some pure pixels of each stain and of background
    concentrations[0, 1::7] = 0.0
    concentrations[1, 2::7] = 0.0
    return np.exp(-(STAINS @ concentrations)).reshape(3, *shape).astype(np.float32)


def _angles(normaliser: StainNormaliser) -> np.ndarray:
    """Degrees between the fitted and the true stain vectors (haematoxylin, eosin)."""
    found = normaliser.stains / np.linalg.norm(normaliser.stains, axis=0)
    return np.degrees(np.arccos(np.clip((found * STAINS).sum(axis=0), -1, 1)))


def test_the_stains_of_a_two_stain_image_are_found() -> None:
    assert (_angles(StainNormaliser(_synthetic_he(), smoothing=0)) < 3).all()  # H first, E second


def test_smoothing_keeps_noise_from_tilting_the_stains() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    concentrations = ndimage.gaussian_filter(rng.uniform(0, 2.5, (2, 128, 128)), (0, 4, 4))  # tissue-like fields
    concentrations = np.clip((concentrations - concentrations.mean((1, 2), keepdims=True)) * 4 + 0.5, 0, None)
    clean = np.exp(-np.einsum("cs,shw->chw", STAINS, concentrations))
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    assert (_angles(StainNormaliser(noisy)) < 5).all()
    assert _angles(StainNormaliser(noisy, smoothing=0)).max() > 10  # without it the fit tilts


def test_the_map_gives_the_reference_stains_and_inverts_exactly() -> None:
    rgb = _synthetic_he()
    normaliser = StainNormaliser(rgb, smoothing=0)
    reference = normaliser.to_reference(rgb)
    expected_od = REFERENCE_STAINS @ np.diag(REFERENCE_MAX_CONCENTRATIONS / normaliser.max_concentrations)
    expected_od = expected_od @ np.linalg.lstsq(normaliser.stains, -np.log(rgb.reshape(3, -1)), rcond=None)[0]
    np.testing.assert_allclose(reference.reshape(3, -1), np.clip(np.exp(-expected_od), 0, 1), atol=2e-4)
    unclipped = ((reference > 0) & (reference < 1)).all(axis=0)  # a clipped pixel cannot come back
    assert unclipped.mean() > 0.8
    np.testing.assert_allclose(normaliser.from_reference(reference)[:, unclipped], rgb[:, unclipped], atol=2e-4)


def test_an_image_without_stained_tissue_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="too little stained tissue"):
        StainNormaliser(np.full((3, 32, 32), 0.95, np.float32))


class _Identity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_denoising_in_the_reference_stains_returns_to_the_image_stains() -> None:
    rgb = _synthetic_he()
    pixels = rgb.transpose(1, 2, 0)
    out = denoise_image(_Identity().eval(), pixels, stain_normalise=True, patch_size=32, precision="fp32")
    reference = StainNormaliser(rgb).to_reference(rgb)
    unclipped = ((reference > 0) & (reference < 1)).all(axis=0)
    np.testing.assert_allclose(out[unclipped], pixels[unclipped], atol=2e-4)


def test_stain_normalisation_is_refused_for_whole_slides(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not whole slides"):
        denoise_slide(_Identity(), tmp_path / "slide.svs", tmp_path / "out.tif", stain_normalise=True)
