"""Stain colour of histology images: augmentation during training and Macenko stain normalisation.

Images are RGB float32 ``[3, H, W]`` in [0, 1]. Optical density (OD) is ``-log(max(I, 1/255))`` per channel.

`stain_augment` varies stains and colours of training tiles (Tellez et al. 2018). `StainNormaliser` is
Macenko et al. (2009): the two stain vectors of an H&E image from the extreme angles of its tissue OD in
the plane of their two main directions, and the concentrations' 99th percentiles. It maps an image's OD
linearly onto the reference stains (Macenko's reference matrix and maxima) and keeps the part of the OD
outside the stain plane as it was, so the map is an invertible 3x3 matrix in OD space:
`from_reference(to_reference(image))` gives the image back exactly wherever the reference image is not
clipped to [0, 1] (and above the floor of 1/255).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mednets.errors import InvalidInputError

__all__ = ["REFERENCE_MAX_CONCENTRATIONS", "REFERENCE_STAINS", "StainNormaliser", "stain_augment"]

# Macenko's reference H&E stain vectors (columns: haematoxylin, eosin; OD per R, G, B) and the 99th
# percentiles of their concentrations, as used by most implementations (e.g. torchstain, staintools).
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONCENTRATIONS = np.array([1.9705, 1.0308])
_FLOOR = 1.0 / 255.0


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> OD ``[3, H * W]``."""
    return -np.log(np.clip(rgb, _FLOOR, 1.0)).reshape(3, -1)


def stain_augment(tile: np.ndarray, rng: np.random.Generator, scale: float = 0.2) -> np.ndarray:
    """Stain and colour augmentation (Tellez et al. 2018) of ``[3, H, W]`` in [0, 1].

    In haematoxylin-eosin-DAB space each stain's optical density is scaled by a factor in
    ``[1 - scale, 1 + scale]`` and shifted by up to ``scale / 20``; with probability 1/2 the eosin and
    DAB stains swap (scaled by U(0.3, 1)), so an IHC image also yields H&E-coloured tiles and the
    reverse. Then hue turns by up to ``scale / 4`` of a turn, saturation and contrast scale by
    ``1 +/- scale`` and brightness shifts by up to ``scale / 4``; with probability 1/2 the RGB channels
    are permuted: a denoiser trained on a few stains otherwise learns their colours as a prior and
    shifts other stains towards them.
    """
    from skimage.color import hed2rgb, hsv2rgb, rgb2hed, rgb2hsv

    stains = rgb2hed(tile.transpose(1, 2, 0))
    stains = stains * rng.uniform(1.0 - scale, 1.0 + scale, 3) + rng.uniform(-scale / 20, scale / 20, 3)
    if rng.random() < 0.5:
        stains = stains[..., [0, 2, 1]] * np.array([1.0, *rng.uniform(0.3, 1.0, 2)])
    hsv = rgb2hsv(np.clip(hed2rgb(stains), 0.0, 1.0))
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-scale / 4, scale / 4)) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.0 - scale, 1.0 + scale), 0.0, 1.0)
    rgb = hsv2rgb(hsv)
    rgb = (rgb - rgb.mean()) * rng.uniform(1.0 - scale, 1.0 + scale) + rgb.mean() + rng.uniform(-scale / 4, scale / 4)
    rgb = np.clip(rgb, 0.0, 1.0).transpose(2, 0, 1).astype(np.float32)
    return rgb[rng.permutation(3)] if rng.random() < 0.5 else rgb


class StainNormaliser:
    """Macenko stain normalisation fitted to one H&E image (module docstring).

    Args:
        rgb: the image to fit, ``[3, H, W]`` in [0, 1].
        od_threshold: least OD in every channel for a pixel to count as stained tissue.
        alpha: percentile of the extreme angles (robust minimum and maximum).
        smoothing: sigma in pixels of a gaussian blur of `rgb` before the fit: stains are a
            low-frequency property, and pixel noise tilts the fitted vectors (benchmarks/RESULTS.md).

    Raises:
        InvalidInputError: fewer than 100 stained pixels, or stains that do not span a plane.
    """

    def __init__(self, rgb: np.ndarray, od_threshold: float = 0.15, alpha: float = 1.0, smoothing: float = 2.0) -> None:
        od = _optical_density(ndimage.gaussian_filter(rgb, (0, smoothing, smoothing)) if smoothing > 0 else rgb)
        tissue = od[:, (od > od_threshold).all(axis=0)]
        if tissue.shape[1] < 100:
            raise InvalidInputError("too little stained tissue to fit stain vectors", source="image",
                                    expected=">= 100 pixels with OD > 0.15 in every channel", got=tissue.shape[1])  # fmt: skip
        _, vectors = np.linalg.eigh(np.cov(tissue))
        plane = vectors[:, 1:]  # the two main directions (eigh sorts eigenvalues ascending)
        projected = plane.T @ tissue
        angles = np.arctan2(projected[1], projected[0])
        low, high = np.percentile(angles, (alpha, 100 - alpha))
        first, second = (plane @ np.array([np.cos(angle), np.sin(angle)]) for angle in (low, high))
        first, second = (vector * np.sign(vector.sum()) for vector in (first, second))  # into positive density
        stains = np.stack([first, second] if first[0] > second[0] else [second, first], axis=1)  # H (red OD) first
        concentrations = np.linalg.lstsq(stains, tissue, rcond=None)[0]
        maxima = np.percentile(concentrations, 99, axis=1)
        if np.linalg.matrix_rank(stains) < 2 or (maxima <= 0).any():
            raise InvalidInputError("stain vectors do not span two stains", source="image", expected="an H&E image")
        self.stains, self.max_concentrations = stains, maxima
        # OD -> reference OD: the stain part re-coloured with the reference stains and scaled to its maxima,
        # the part outside the stain plane kept.
        pseudo_inverse = np.linalg.pinv(stains)
        scale = np.diag(REFERENCE_MAX_CONCENTRATIONS / maxima)
        self.matrix = REFERENCE_STAINS @ scale @ pseudo_inverse + (np.eye(3) - stains @ pseudo_inverse)

    def _apply(self, rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        od = matrix @ _optical_density(rgb)
        return np.clip(np.exp(-od), 0.0, 1.0).reshape(rgb.shape).astype(np.float32)

    def to_reference(self, rgb: np.ndarray) -> np.ndarray:
        """`rgb` ``[3, H, W]`` in the reference stains."""
        return self._apply(rgb, self.matrix)

    def from_reference(self, rgb: np.ndarray) -> np.ndarray:
        """The inverse of `to_reference`: an image in the reference stains back in the fitted image's stains."""
        return self._apply(rgb, np.linalg.inv(self.matrix))
