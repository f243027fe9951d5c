"""MR-like intensities for the phantoms: the drawn CT anatomy re-rendered as a T1-weighted-like image in arbitrary units.

The same anatomy and labels as the CT phantom; only the intensities change. Tissue intensity is
relative to fat (1.0), like a contrast-enhanced T1-weighted gradient echo without fat suppression
(portal venous phase, as the CT):

=====================  =====  ================================================
tissue                 T1     from the drawn CT value (HU)
=====================  =====  ================================================
air, bowel gas         0.0    -1000
lung                   0.04   -850
fat                    1.0    -120 to -80 (brightest)
stool, fat mixtures    0.55   -40
fluid: bile, urine,    0.12   0 to 20 (dark)
CSF, bowel contents
muscle, bowel wall     0.33   45
enhancing vessels      0.70   140 (blood pool 0.78 at 240)
cancellous bone        0.78   240 (fatty marrow)
cortical bone          0.05   700 (dark); metal clips 0.0 (signal void)
=====================  =====  ================================================

Organ parenchyma (labelled voxels between -20 and 300 HU) takes its own value plus 0.003 per HU
away from the organ's drawn value, which keeps texture, the kidneys' cortex (175 HU, 0.66) above
their medulla (85 HU, 0.39), hepatic veins bright in the liver and gastric contents dark:
pancreas 0.66, liver 0.62, kidneys 0.52, spleen 0.50, adrenals 0.42, stomach wall 0.40,
oesophagus 0.38, gallbladder bile 0.12, aorta 0.85, portal/splenic vein 0.82, IVC 0.78.

Then a smooth multiplicative bias field (three sine modes of 400-900 mm wavelength, about
+-30 %), Rician noise (magnitude of a complex signal with noise of 1.5-4 % of fat on each part)
and a random global scale per case (brightest voxel 500-4000): intensities are not comparable
across cases, so a planner must normalise each image (z-score), as for real MR.
"""

from __future__ import annotations

import math

import numpy as np

from mednets import anatomy
from mednets.data.phantom_grid import box_noise

__all__ = ["MR_ORGAN_T1", "MR_TISSUE_T1", "bias_field", "mr_intensity", "to_arbitrary_units"]

# (HU, T1 relative to fat): the tissue curve for unlabelled voxels, linear between points.
MR_TISSUE_T1: tuple[tuple[float, float], ...] = (
    (-1000.0, 0.0), (-900.0, 0.01), (-850.0, 0.04), (-500.0, 0.08), (-400.0, 0.12), (-150.0, 0.9),
    (-120.0, 1.0), (-80.0, 1.0), (-40.0, 0.55), (0.0, 0.12), (20.0, 0.15), (45.0, 0.33), (70.0, 0.38),
    (140.0, 0.70), (240.0, 0.78), (320.0, 0.55), (450.0, 0.15), (700.0, 0.05), (3071.0, 0.0),
)  # fmt: skip
# Organ: (drawn HU of its parenchyma, T1 relative to fat).
MR_ORGAN_T1: dict[str, tuple[float, float]] = {
    "liver": (60.0, 0.62),
    "spleen": (50.0, 0.50),
    "pancreas": (45.0, 0.66),
    "right_kidney": (130.0, 0.52),
    "left_kidney": (130.0, 0.52),
    "right_adrenal": (40.0, 0.42),
    "left_adrenal": (40.0, 0.42),
    "gallbladder": (10.0, 0.12),
    "stomach": (68.0, 0.40),
    "esophagus": (45.0, 0.38),
    "aorta": (205.0, 0.85),
    "inferior_vena_cava": (155.0, 0.78),
    "portal_splenic_vein": (175.0, 0.82),
}
_T1_PER_HU = 0.003  # parenchymal texture and internal structure carried over from the CT values
_PARENCHYMA_HU = (-20.0, 300.0)  # labelled voxels outside (gas, sinus fat) follow the tissue curve


def mr_intensity(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """T1-like intensity (fat = 1) ``[D, H, W]`` float32 of a drawn CT (HU) and its organ labels."""
    knots_hu, knots_t1 = (np.asarray(column, dtype=np.float32) for column in zip(*MR_TISSUE_T1, strict=True))
    intensity = np.interp(hu, knots_hu, knots_t1).astype(np.float32)
    parenchyma = (hu > _PARENCHYMA_HU[0]) & (hu < _PARENCHYMA_HU[1])
    for name, (organ_hu, t1) in MR_ORGAN_T1.items():
        inside = parenchyma & (labels == anatomy.organ_id(name))
        intensity[inside] = np.maximum(t1 + _T1_PER_HU * (hu[inside] - organ_hu), 0.02)
    return intensity


def bias_field(rng: np.random.Generator, axes: list[np.ndarray]) -> np.ndarray:
    """A smooth multiplicative field ``[D, H, W]`` over the grid of mm coordinates `axes` (z, y, x)."""
    log_bias = np.zeros([len(a) for a in axes], dtype=np.float32)
    for _ in range(3):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = (2 * math.pi / rng.uniform(400.0, 900.0)) * direction
        phase = rng.uniform(0, 2 * math.pi)
        argument = (
            (k[0] * axes[0])[:, None, None] + (k[1] * axes[1])[None, :, None] + (k[2] * axes[2])[None, None, :]
        ).astype(np.float32)
        log_bias += np.float32(rng.uniform(0.05, 0.12)) * np.sin(argument + np.float32(phase))
    return np.exp(log_bias)


def to_arbitrary_units(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """Rician noise and a random global scale: int16 (non-negative) ``[D, H, W]`` and the values drawn.

    Args:
        image: noiseless intensity relative to fat, float32 ``[D, H, W]``.
        rng: the case's MR random stream.
    """
    noise = float(rng.uniform(0.015, 0.04))
    max_intensity = float(rng.uniform(500.0, 4000.0))
    real = box_noise(rng, image.shape)
    real *= np.float32(noise)
    real += image
    np.square(real, out=real)
    imaginary = box_noise(rng, image.shape)
    imaginary *= np.float32(noise)
    np.square(imaginary, out=imaginary)
    real += imaginary
    del imaginary
    np.sqrt(real, out=real)
    real *= np.float32(max_intensity / max(float(real.max()), 1e-6))
    np.rint(real, out=real)
    np.clip(real, 0, np.iinfo(np.int16).max, out=real)
    return real.astype(np.int16), {"mr_noise": round(noise, 4), "max_intensity": round(max_intensity, 1)}
