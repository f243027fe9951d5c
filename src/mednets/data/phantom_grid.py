"""The drawing grid of fine-voxel phantoms: anatomy drawn on a coarse grid, then resampled to the scan's voxels.

Drawing the implicit shapes voxel by voxel makes a 512x512x300 scan take about a minute. When a grid
of about 2.5 mm (slices) by 1.6 mm (in-plane) has at least 4 times fewer voxels than the scan (in
practice: in-plane spacing under about 1.07 mm), the phantom generator draws on that coarse grid
instead: every axis keeps its own spacing times an integer factor (``round(DRAWING_MM / spacing)``,
at least 1), so coarse nodes fall exactly on scan voxels, and in-plane only the body's box
(``|x| <= 215 mm``, ``|y| <= 175 mm``) is drawn; the rest of a wide field of view is air. Then, at
the scan's voxels:

- intensities are blurred on the coarse grid (half a coarse voxel along upsampled axes, against
  staircases; the 64³ path's 0.6 voxel along the others) and linearly interpolated;
- labels come from each organ's one-hot, smoothed by half a coarse voxel and linearly interpolated:
  a voxel takes the most likely organ where that beats the background (smooth, sub-voxel boundaries
  that sit where the interpolated image crosses between tissues);
- noise is drawn at full resolution (`box_noise`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "DRAWING_MM",
    "DrawingGrid",
    "blur_drawing",
    "box_noise",
    "drawing_grid",
    "upsample_intensities",
    "upsample_labels",
    "uses_drawing_grid",
]

DRAWING_MM = (2.5, 1.6, 1.6)  # (z, y, x): anatomy drawn at about this spacing on fine-voxel scans
_BODY_HALF_EXTENT_MM = (175.0, 215.0)  # (y, x): every drawn structure lies inside, deformation included
_BLUR_VOXELS = 0.6  # partial-volume blur along axes drawn at the scan's spacing (as the 64³ path)
_ANTIALIAS = 0.5  # coarse voxels of blur along upsampled axes: no staircase at tissue borders
_BOX_NOISE_STD = math.sqrt(8 * (256**2 - 1) / 12)  # 8 uniform bytes summed


def _factors(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(max(1, round(t / float(s))) for t, s in zip(DRAWING_MM, spacing, strict=True))  # type: ignore[return-value]


def uses_drawing_grid(spacing: tuple[float, float, float]) -> bool:
    """Whether a phantom with this voxel size (mm, ``(D, H, W)``) is drawn on the coarse grid."""
    return math.prod(_factors(spacing)) >= 4


@dataclass(frozen=True)
class DrawingGrid:
    """Where the coarse grid sits in the scan.

    Attributes:
        shape: the scan's array shape ``(D, H, W)``.
        spacing: the scan's voxel size in mm.
        factors: scan voxels per coarse voxel along each axis.
        start: first scan index of the drawn region per axis (the rest is air).
        stop: one past the last scan index of the drawn region per axis.
        coarse_shape: the coarse grid's shape; node ``j`` sits on scan index ``start + j * factor``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    factors: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    coarse_shape: tuple[int, int, int]

    @property
    def coarse_spacing(self) -> tuple[float, float, float]:
        return tuple(s * f for s, f in zip(self.spacing, self.factors, strict=True))  # type: ignore[return-value]

    @property
    def region(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def axes(self, z_offset: float) -> list[np.ndarray]:
        """Undeformed mm coordinates (z, y, x) of the coarse nodes, on the scan's centred axes."""
        return [
            ((start + factor * np.arange(m)).astype(np.float32) - (n - 1) / 2.0) * s + (z_offset if i == 0 else 0.0)
            for i, (n, s, factor, start, m) in enumerate(
                zip(self.shape, self.spacing, self.factors, self.start, self.coarse_shape, strict=True)
            )
        ]


def drawing_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> DrawingGrid:
    """The coarse grid for a scan of `shape` voxels of `spacing` mm ``(D, H, W)``."""
    factors = _factors(spacing)
    start, stop, coarse = [], [], []
    for axis, (n, s, factor) in enumerate(zip(shape, spacing, factors, strict=True)):
        first, last = 0, n - 1
        if axis > 0:  # in-plane: only the body's box is drawn
            reach = _BODY_HALF_EXTENT_MM[axis - 1] / s
            first = max(first, math.ceil((n - 1) / 2.0 - reach))
            last = min(last, math.floor((n - 1) / 2.0 + reach))
        start.append(first)
        stop.append(last + 1)
        coarse.append(math.ceil((last - first) / factor) + 1)  # the last node may lie past the region
    return DrawingGrid(tuple(shape), tuple(spacing), factors, (*start,), (*stop,), (*coarse,))  # type: ignore[arg-type]


def blur_drawing(coarse: np.ndarray, grid: DrawingGrid) -> np.ndarray:
    """Partial-volume blur of the coarse drawing: 0.6 voxel along axes drawn at the scan's own spacing
    (as the 64³ path), half a coarse voxel along upsampled ones (interpolation blurs them further)."""
    sigma = [_BLUR_VOXELS if factor == 1 else _ANTIALIAS for factor in grid.factors]
    return ndimage.gaussian_filter(coarse, sigma)


def _interpolate(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Trilinear interpolation of a coarse block onto the scan voxels between its first and last nodes."""
    size = tuple((m - 1) * f + 1 for m, f in zip(block.shape, factors, strict=True))
    if size == block.shape:
        return block
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="trilinear", align_corners=True)[0, 0].numpy()


def upsample_intensities(coarse: np.ndarray, grid: DrawingGrid, fill: float) -> np.ndarray:
    """The scan-sized float32 image ``[D, H, W]`` from the coarse one; `fill` outside the drawn region."""
    fine = _interpolate(coarse, grid.factors)
    extent = tuple(b - a for a, b in zip(grid.start, grid.stop, strict=True))
    if extent == grid.shape and fine.shape == grid.shape:
        return fine
    image = np.full(grid.shape, fill, dtype=np.float32)
    image[grid.region] = fine[: extent[0], : extent[1], : extent[2]]
    return image


def upsample_labels(coarse: np.ndarray, grid: DrawingGrid) -> np.ndarray:
    """The scan-sized uint8 label map ``[D, H, W]`` from the coarse one (smoothed one-hot, interpolated, argmax)."""
    labels = np.zeros(grid.shape, dtype=np.uint8)
    objects = [(label, box) for label, box in enumerate(ndimage.find_objects(coarse), 1) if box is not None]
    if not objects:
        return labels
    sigma = [_ANTIALIAS if f > 1 else 0.0 for f in grid.factors]
    pad = [math.ceil(4 * s) for s in sigma]  # the filter's reach: the smoothed one-hot is zero beyond
    extent = [b - a for a, b in zip(grid.start, grid.stop, strict=True)]
    boxes = [
        (label, [(max(0, b.start - p), min(m, b.stop + p)) for b, p, m in zip(box, pad, coarse.shape, strict=True)])
        for label, box in objects
    ]
    # Scan voxels (relative to the drawn region) covered by the union of the organs' boxes.
    low = [min(box[axis][0] for _, box in boxes) * grid.factors[axis] for axis in range(3)]
    high = [
        min(extent[axis], (max(box[axis][1] for _, box in boxes) - 1) * grid.factors[axis] + 1) for axis in range(3)
    ]
    union = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    best = np.zeros([b - a for a, b in zip(low, high, strict=True)], dtype=np.float32)
    total = np.zeros_like(best)
    chosen = np.zeros(best.shape, dtype=np.uint8)
    for label, box in boxes:
        one_hot = (coarse[tuple(slice(a, b) for a, b in box)] == label).astype(np.float32)
        if any(sigma):
            one_hot = ndimage.gaussian_filter(one_hot, sigma, mode="constant")
        fine = _interpolate(one_hot, grid.factors)
        first = [a * f - lo for (a, _), f, lo in zip(box, grid.factors, low, strict=True)]
        size = [min(n, len_ - o) for n, len_, o in zip(fine.shape, best.shape, first, strict=True)]
        target = tuple(slice(o, o + n) for o, n in zip(first, size, strict=True))
        fine = fine[: size[0], : size[1], : size[2]]
        better = fine > best[target]
        best[target] = np.where(better, fine, best[target])
        chosen[target][better] = label
        total[target] += fine
    total += best
    chosen[total < 1.0] = 0  # the background (1 - sum of organs) beats the best organ
    region = labels[grid.region]
    region[union] = chosen
    return labels


def box_noise(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Zero-mean, unit-variance noise ``[D, H, W]`` correlated over 2 voxels per axis, as float32.

    Each voxel sums a 2x2x2 box of uniform random bytes (near Gaussian by the central limit), a
    tenth of the cost of smoothing Gaussian noise at 512x512x300.
    """
    depth, height, width = shape
    values = rng.integers(0, 256, size=(depth + 1, height + 1, width + 1), dtype=np.uint8)
    summed = np.add(values[:-1], values[1:], dtype=np.int16)
    summed = np.add(summed[:, :-1], summed[:, 1:])
    noise = np.add(summed[:, :, :-1], summed[:, :, 1:], dtype=np.float32)
    noise -= np.float32(8 * 255 / 2)
    noise *= np.float32(1.0 / _BOX_NOISE_STD)
    return noise
