"""Synthetic abdominal CT: the 13 BTCV organs inside a body, in Hounsfield units, with absent organs on demand.

The phantom is the built-in data of mednets (demo, tests, benchmarks). It is drawn, not simulated:
every structure is an implicit shape (ellipsoid, tube along a polyline, shell) evaluated on smoothly
deformed patient coordinates, painted in anatomical order, then blurred (partial volume) and noised.

Patient coordinates are millimetres in LPS+ (x to the patient's left, y posterior, z superior),
centred on the first lumbar vertebra. The array is ``[D, H, W] = [z, y, x]`` with ``d`` increasing
superiorly, ``h`` posteriorly and ``w`` to the patient's left, so an axial slice shown with
``imshow`` is in the radiological convention; the RAS affine is ``diag(-sx, -sy, sz)`` (orientation
code ``"LPS"``).

Intensities (contrast-enhanced, portal venous phase): air -1000, lung about -850, fat about -100,
muscle about 50, liver 60, spleen 50, pancreas 45, adrenals 40, gallbladder bile 10, kidney cortex
about 160 above medulla about 95, aorta 200, portal/splenic vein 175, inferior vena cava 155, bone
about 250 (cancellous) to 700 (cortex). Sizes follow typical adult volumes (`mednets.anatomy`).

Scenarios (each drawn with its own rate; one per site: kidneys, spleen, scan ends; see `SCENARIOS`):
organs absent after surgery (nephrectomy, splenectomy, cholecystectomy; clips left in some cases
only) or from birth (renal agenesis: the other kidney is larger); organs present but small (atrophy,
partial resection by a plane); and a field of view whose top or bottom edge lies at a random level,
which removes some organs and cuts others. Bowel loops fill most emptied renal and liver beds.
Every organ is recorded present (>= `min_voxels` voxels) or absent with the reason, small present
organs with theirs; organs left with fewer voxels than that by truncation are erased from the label
map so the record and the labels always agree. Scenarios draw from a random stream of their own, so
a case's anatomy is the same whatever its scenarios (a nephrectomy case is its twin without the kidney).

Full-size scans: with ``mixed_spacing`` every case gets its own voxel size (in-plane 0.6-0.95 mm,
slices of 1.25-5 mm) and slice count, like a clinical dataset; scans with in-plane voxels under
about 1.07 mm are drawn on a coarse grid (2.5 mm slices, 1.6 mm in-plane) and resampled
(`mednets.data.phantom_grid`), so a 512x512x300 case takes seconds; the 64³ default is drawn
voxel by voxel. ``modality="mr"`` renders the same anatomy and labels as an MR-like image
in arbitrary units (`mednets.data.phantom_mr`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from mednets import anatomy
from mednets.atomic import atomic_write_text
from mednets.data.dataset import DEFAULT_MIN_VOXELS
from mednets.data.phantom_grid import (
    DrawingGrid,
    blur_drawing,
    box_noise,
    drawing_grid,
    upsample_intensities,
    upsample_labels,
    uses_drawing_grid,
)
from mednets.data.phantom_mr import bias_field, mr_intensity, to_arbitrary_units
from mednets.errors import ConfigError, UnknownNameError
from mednets.host_memory import reuse_freed_memory

__all__ = [
    "DEFAULT_ABSENCE_RATES",
    "MODALITIES",
    "SCENARIOS",
    "Phantom",
    "PhantomConfig",
    "Scenario",
    "Canvas",
    "case_geometry",
    "check_rates",
    "default_workers",
    "generate_phantom",
    "parse_absence_rates",
    "rotation",
    "smooth_noise",
    "write_phantom_dataset",
]


class Scenario(NamedTuple):
    """What a scenario does to a case.

    Attributes:
        organs: the organs it makes absent (``effect="absent"``) or small (``"small"``, still present).
        reason: the reason written into the case's record (``absent`` or ``small``).
        effect: ``"absent"``, ``"small"`` or ``"fov"`` (the field of view moves: organs lost or cut).
        site: scenarios of one site exclude each other in a case (one kidney scenario per patient).
        clip_rate: probability that surgical clips stay (at the vessel stumps or the resection margin).
    """

    organs: tuple[str, ...]
    reason: str
    effect: str
    site: str
    clip_rate: float = 0.0


SCENARIOS: dict[str, Scenario] = {
    "left_nephrectomy": Scenario(("left_kidney",), "left nephrectomy", "absent", "kidney", 0.5),
    "right_nephrectomy": Scenario(("right_kidney",), "right nephrectomy", "absent", "kidney", 0.5),
    "left_renal_agenesis": Scenario(("left_kidney",), "congenital absence (solitary kidney)", "absent", "kidney"),
    "right_renal_agenesis": Scenario(("right_kidney",), "congenital absence (solitary kidney)", "absent", "kidney"),
    "splenectomy": Scenario(("spleen",), "splenectomy", "absent", "spleen", 0.5),
    "cholecystectomy": Scenario(("gallbladder",), "cholecystectomy", "absent", "gallbladder", 0.7),
    "truncated_top": Scenario((), "outside the field of view (truncated at the top)", "fov", "fov"),
    "truncated_bottom": Scenario((), "outside the field of view (truncated at the bottom)", "fov", "fov"),
    "left_kidney_atrophy": Scenario(("left_kidney",), "atrophy (small kidney)", "small", "kidney"),
    "right_kidney_atrophy": Scenario(("right_kidney",), "atrophy (small kidney)", "small", "kidney"),
    "splenic_atrophy": Scenario(("spleen",), "atrophy (small spleen)", "small", "spleen"),
    "left_partial_nephrectomy": Scenario(("left_kidney",), "partial nephrectomy", "small", "kidney", 0.7),
    "right_partial_nephrectomy": Scenario(("right_kidney",), "partial nephrectomy", "small", "kidney", 0.7),
    "partial_hepatectomy": Scenario(("liver",), "partial hepatectomy (left lobe resected)", "small", "liver", 0.5),
}
DEFAULT_ABSENCE_RATES: dict[str, float] = {
    "left_nephrectomy": 0.08,
    "right_nephrectomy": 0.08,
    "left_renal_agenesis": 0.06,
    "right_renal_agenesis": 0.06,
    "splenectomy": 0.1,
    "cholecystectomy": 0.15,
    "truncated_top": 0.08,
    "truncated_bottom": 0.08,
    "left_kidney_atrophy": 0.05,
    "right_kidney_atrophy": 0.05,
    "splenic_atrophy": 0.08,
    "left_partial_nephrectomy": 0.05,
    "right_partial_nephrectomy": 0.05,
    "partial_hepatectomy": 0.08,
}
# Where the cut edge of a truncated scan lies (patient z, mm): anywhere from below the kidneys to the
# liver dome, so organs are lost or cut at every level.
TRUNCATED_TOP_EDGE_MM = (-70.0, 130.0)
TRUNCATED_BOTTOM_EDGE_MM = (-60.0, 130.0)
ATROPHY_VOLUME = (0.3, 0.5)  # of the organ's normal volume
HYPERTROPHY_VOLUME = (1.3, 1.5)  # compensatory growth of a solitary kidney
DISPLACED_BOWEL_RATE = 0.8  # empty renal and liver beds filled by bowel loops rather than fat
CLIP_HU = 6000.0  # metal: about 1800 HU after the partial-volume blur of a 5 mm voxel, above any bone
DEFAULT_FOV_MM = 320.0  # 64 voxels of 5 mm: diaphragm domes to iliac crests with margin
MODALITIES = ("ct", "mr")
# Mixed spacing: clinical abdominal CT voxel sizes and craniocaudal coverage.
MIXED_IN_PLANE_MM = (0.6, 0.95)
MIXED_SLICE_MM = (1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
MIXED_COVERAGE_MM = (300.0, 450.0)
MIXED_MIN_SLICES = 120
MIXED_MAX_FAT_MM = 60.0
_ID = {o.name: o.id for o in anatomy.ORGANS}
_P = 2.6  # superellipse exponent of body sections: the abdomen is a rounded rectangle


@dataclass(frozen=True)
class PhantomConfig:
    """How phantoms are drawn.

    Attributes:
        shape: array shape ``(D, H, W)``; with `mixed_spacing`, ``H W`` of every case and ``D`` the
            most slices.
        spacing: voxel size in mm ``(D, H, W)``; None gives a 320 mm field of view on every axis
            (5 mm at the default 64 voxels). None with `mixed_spacing`.
        absence_rates: probability of each scenario of `SCENARIOS` per case.
        noise_hu: standard deviation of the image noise in HU.
        min_voxels: an organ with fewer voxels is recorded absent and erased from the labels.
        mixed_spacing: draw each case's voxel size: in-plane uniform in `MIXED_IN_PLANE_MM`, slices
            one of `MIXED_SLICE_MM`, as many as cover 300-450 mm, clipped to
            ``[min(120, D), D]`` (``--shape 300 512 512``: 512x512, 120-300 slices); subcutaneous
            fat up to 60 mm instead of 35.
        modality: ``"ct"`` (HU) or ``"mr"`` (the same anatomy in arbitrary units, `mednets.data.phantom_mr`).
    """

    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] | None = None
    absence_rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ABSENCE_RATES))
    noise_hu: float = 12.0
    min_voxels: int = DEFAULT_MIN_VOXELS
    mixed_spacing: bool = False
    modality: str = "ct"

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ConfigError("phantom shape must be 3 sizes of at least 8", source="shape", got=self.shape)
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError("spacing must be 3 positive sizes in mm", source="spacing", got=self.spacing)
        if self.mixed_spacing and self.spacing is not None:
            raise ConfigError(
                "mixed spacing draws each case's spacing: give no spacing with it", source="spacing", got=self.spacing
            )
        if self.modality not in MODALITIES:
            raise UnknownNameError(
                "unknown phantom modality", source="modality", expected=", ".join(MODALITIES), got=self.modality
            )
        check_rates(self.absence_rates, SCENARIOS)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        if self.spacing is not None:
            return tuple(float(s) for s in self.spacing)  # type: ignore[return-value]
        return tuple(DEFAULT_FOV_MM / n for n in self.shape)  # type: ignore[return-value]

    def generate(self, seed: int, case_index: int) -> Phantom:
        """Case `case_index` of the dataset drawn with `seed` (`generate_phantom`)."""
        return generate_phantom(seed, self, case_index=case_index)

    def dataset_info(self, seed: int) -> dict[str, Any]:
        """dataset.json's description of these phantoms: name, description, channels, labels, generator settings."""
        generator: dict[str, Any] = {
            "seed": int(seed),
            "shape": list(self.shape),
            "spacing_mm": [round(s, 6) for s in self.spacing_mm],
            "absence_rates": {k: self.absence_rates.get(k, 0.0) for k in SCENARIOS},
            "noise_hu": self.noise_hu,
        }
        if self.mixed_spacing:  # the per-case record holds each case's shape and spacing
            generator["spacing_mm"] = "per case"
            generator["mixed_spacing"] = {
                "in_plane_mm": list(MIXED_IN_PLANE_MM),
                "slice_mm": list(MIXED_SLICE_MM),
                "coverage_mm": list(MIXED_COVERAGE_MM),
                "slices": [min(MIXED_MIN_SLICES, self.shape[0]), self.shape[0]],
            }
        mr = self.modality == "mr"
        if mr:
            generator["modality"] = "mr"
            del generator["noise_hu"]
        description = (
            "Synthetic T1-weighted-like abdominal MR (mednets.data.phantoms), arbitrary units, LPS orientation"
            if mr
            else "Synthetic contrast-enhanced abdominal CT (mednets.data.phantoms), HU, LPS orientation"
        )
        return {"name": "mednets_phantoms", "description": description, "channel_names": {"0": "MR" if mr else "CT"},
                "labels": anatomy.label_names(), "generator": generator}  # fmt: skip


def check_rates(rates: dict[str, float], scenarios: Mapping[str, Any]) -> None:
    """Raise unless every rate names one of `scenarios` and lies in [0, 1]."""
    for name, rate in rates.items():
        if name not in scenarios:
            raise UnknownNameError("unknown absence scenario", source="absence_rates", expected=", ".join(scenarios),
                                   got=name)  # fmt: skip
        if not 0.0 <= float(rate) <= 1.0:
            raise ConfigError("absence rate must be in [0, 1]", source=f"absence_rates.{name}", got=rate)


@dataclass
class Phantom:
    """One generated case.

    Attributes:
        image: int16 HU ``[D, H, W]``.
        labels: uint8 organ ids ``[D, H, W]`` (`mednets.anatomy` numbering).
        affine: 4x4 RAS affine (index ``(w, h, d)`` to mm).
        scenarios: the scenarios applied.
        absent: {organ name: reason} for every organ without voxels.
        cut: {organ name: reason} for present organs touching the top or bottom slice.
        info: drawing parameters for the record: size factor, field-of-view shift, ``clips`` (organs
            whose surgical clips are in view), ``displaced_bowel`` (organs whose emptied bed bowel fills).
        small: {organ name: reason} for present organs drawn small (atrophy, partial resection).
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    scenarios: list[str]
    absent: dict[str, str]
    cut: dict[str, str]
    info: dict[str, Any]
    small: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The case's entry in dataset.json ``cases``."""
        return {"scenarios": self.scenarios, "absent": self.absent, "cut": self.cut, "small": self.small, **self.info}


def parse_absence_rates(
    text: str | float | dict[str, float] | None, defaults: Mapping[str, float] = DEFAULT_ABSENCE_RATES
) -> dict[str, float]:
    """Absence rates from a number (every scenario), ``"name=rate,name=rate"`` (others keep `defaults`) or a dict.

    `defaults` names the scenarios (the abdominal phantoms' by default; `phantom_thorax.DEFAULT_ABSENCE_RATES`).

    Raises:
        ConfigError: not a number nor name=rate pairs, or a rate that is not a number.
        UnknownNameError: a name that is not a scenario.
    """
    if text is None:
        return dict(defaults)
    if isinstance(text, dict):
        given: dict[str, Any] = dict(text)
    else:
        try:
            return dict.fromkeys(defaults, float(text))
        except ValueError:
            items = [item.partition("=") for item in str(text).split(",")]
        if not all(sep for _, sep, _ in items):
            raise ConfigError("absence rates are a number or name=rate pairs", source="--absence-rate", got=text)
        given = {name.strip(): value for name, _, value in items}
    rates = dict(defaults)
    for name, value in given.items():
        if name not in defaults:
            raise UnknownNameError("unknown absence scenario", source="--absence-rate", expected=", ".join(defaults),
                                   got=name)  # fmt: skip
        try:
            rates[name] = float(value)
        except ValueError as error:
            raise ConfigError("absence rate must be a number", source=f"--absence-rate {name}", got=value) from error
    return rates


class Canvas:
    """Deformed patient coordinates, the HU image and the label map being painted."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        z_offset: float,
        rng: np.random.Generator,
        axes: list[np.ndarray] | None = None,
    ):
        self.shape = shape
        self.spacing = spacing
        self.axes = axes or [  # undeformed mm coordinates of each index axis (z, y, x), centred on the field of view
            (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s + (z_offset if i == 0 else 0.0)
            for i, (n, s) in enumerate(zip(shape, spacing, strict=True))
        ]
        self.z, self.y, self.x = self._deformed(rng)
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.margin = 14.0  # mm: the largest displacement plus a voxel, for bounding boxes

    def _deformed(self, rng: np.random.Generator) -> list[np.ndarray]:
        # Smooth random deformation: a few low-frequency sine modes per axis (wavelengths 150-450 mm,
        # amplitudes up to ~7 mm): organs bend and bulge without tearing, cheaply.
        grids = np.meshgrid(*self.axes, indexing="ij", copy=False)
        out = []
        for axis in range(3):
            displacement = np.zeros(self.shape, dtype=np.float32)
            for _ in range(3):
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                wavelength = rng.uniform(150.0, 450.0)
                phase = rng.uniform(0, 2 * math.pi)
                k = (2 * math.pi / wavelength) * direction
                argument = (
                    (k[0] * self.axes[0])[:, None, None]
                    + (k[1] * self.axes[1])[None, :, None]
                    + (k[2] * self.axes[2])[None, None, :]
                )
                displacement += np.float32(rng.uniform(1.5, 4.0)) * np.sin(argument + phase, dtype=np.float32)
            out.append((grids[axis] + displacement).astype(np.float32))
        return out

    def box(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice]:
        """Index slices covering the mm box [low, high] (z, y, x) plus the deformation margin."""
        slices = []
        for axis in range(3):
            coords = self.axes[axis]
            inside = np.nonzero((coords >= low[axis] - self.margin) & (coords <= high[axis] + self.margin))[0]
            if inside.size == 0:
                return (slice(0, 0),) * 3  # empty: shapes outside the field of view paint nothing
            slices.append(slice(int(inside[0]), int(inside[-1]) + 1))
        return tuple(slices)  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.z[box], self.y[box], self.x[box]

    def ellipsoid(self, center, semi, rotation: np.ndarray | None = None):
        """(box, q) with q = squared normalised radius (<= 1 inside) of an ellipsoid given as (z, y, x) mm."""
        center = np.asarray(center, dtype=np.float32)
        semi = np.asarray(semi, dtype=np.float32)
        reach = float(semi.max())
        box = self.box(center - reach, center + reach)
        z, y, x = self.coords(box)
        dz, dy, dx = z - center[0], y - center[1], x - center[2]
        if rotation is not None:
            r = rotation.astype(np.float32)
            dz, dy, dx = (r[0, 0] * dz + r[0, 1] * dy + r[0, 2] * dx, r[1, 0] * dz + r[1, 1] * dy + r[1, 2] * dx,
                          r[2, 0] * dz + r[2, 1] * dy + r[2, 2] * dx)  # fmt: skip
        return box, (dz / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dx / semi[2]) ** 2

    def tube(self, points, radii):
        """(box, m, r) of a tube along a polyline: m = distance / local radius (<= 1 inside), r = local radius (mm)."""
        points = np.asarray(points, dtype=np.float32)
        radii = np.asarray(radii, dtype=np.float32)
        box = self.box(points.min(0) - radii.max(), points.max(0) + radii.max())
        z, y, x = self.coords(box)
        best = np.full(z.shape, np.inf, dtype=np.float32)
        best_radius = np.zeros(z.shape, dtype=np.float32)
        for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
            ab = b - a
            length2 = float(ab @ ab) or 1e-6
            t = np.clip(((z - a[0]) * ab[0] + (y - a[1]) * ab[1] + (x - a[2]) * ab[2]) / length2, 0.0, 1.0)
            distance = np.sqrt((z - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (x - a[2] - t * ab[2]) ** 2)
            radius = ra + t * (rb - ra)
            metric = distance / radius
            closer = metric < best
            best = np.where(closer, metric, best)
            best_radius = np.where(closer, radius, best_radius)
        return box, best, best_radius

    def paint(self, box, mask, hu, label: int | None = None, allowed: np.ndarray | None = None) -> None:
        """Set HU (a number or an array over the box) and optionally the label where `mask` (and `allowed`) hold."""
        if allowed is not None:
            mask = mask & allowed[box]
        region = self.hu[box]
        region[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
        if label is not None:
            self.labels[box][mask] = label


def rotation(axis: str, degrees: float) -> np.ndarray:
    """Rotation matrix acting on (z, y, x) vectors about one patient axis."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "z":  # in the axial (y, x) plane
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":  # in the coronal (z, x) plane
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])  # "x": in the sagittal (z, y) plane


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed over `sigma` voxels (texture and correlated CT noise)."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field_ / max(float(field_.std()), 1e-6)


def _coarse_noise(rng: np.random.Generator, shape: tuple[int, ...], cell_mm: float, spacing) -> np.ndarray:
    """Unit-variance smooth noise with blobs about `cell_mm` wide (bowel loops), by upsampling a small grid."""
    small = tuple(max(2, round(n * s / cell_mm) + 1) for n, s in zip(shape, spacing, strict=True))
    grid = rng.standard_normal(small).astype(np.float32)
    zoomed = ndimage.zoom(
        grid, [n / m for n, m in zip(shape, small, strict=True)], order=1, mode="nearest", grid_mode=True
    )
    zoomed = zoomed[: shape[0], : shape[1], : shape[2]]
    return (zoomed - zoomed.mean()) / max(float(zoomed.std()), 1e-6)


def _draw_scenarios(rng: np.random.Generator, rates: dict[str, float]) -> list[str]:
    """The case's scenarios in `SCENARIOS` order, one per site (drawn at random among those chosen)."""
    chosen = [name for name in SCENARIOS if rng.random() < rates.get(name, 0.0)]
    # One kidney scenario per patient keeps at least one normal-sized kidney, and a scan is truncated at one end.
    kept = set()
    for site in dict.fromkeys(SCENARIOS[name].site for name in chosen):
        rivals = [name for name in chosen if SCENARIOS[name].site == site]
        kept.add(rivals[int(rng.integers(len(rivals)))])
    return [name for name in chosen if name in kept]


@dataclass
class _Changes:
    """What a case's scenarios do to its anatomy (drawn from the scenario stream).

    Attributes:
        absent: {organ: reason} of organs not drawn.
        small: {organ: reason} of organs drawn small.
        volume: {organ: factor} on an organ's volume (atrophy, compensatory hypertrophy).
        resection: {organ: plane} where a resection plane cuts it, in units of a semi-axis from a centre
            (kidney: its long axis, negative for the lower pole; liver: the right lobe's, towards the left).
        clips: organs whose vessel stumps or resection margin keep surgical clips.
        bowel_bed: organs whose empty bed bowel loops fill (an absent kidney, the resected liver).
    """

    absent: dict[str, str] = field(default_factory=dict)
    small: dict[str, str] = field(default_factory=dict)
    volume: dict[str, float] = field(default_factory=dict)
    resection: dict[str, float] = field(default_factory=dict)
    clips: set[str] = field(default_factory=set)
    bowel_bed: set[str] = field(default_factory=set)


def _plan_changes(scenarios: list[str], rng: np.random.Generator) -> _Changes:
    """Draw what each of the case's scenarios does (volumes, resection planes, clips, bowel)."""
    changes = _Changes()
    for name in scenarios:
        scenario = SCENARIOS[name]
        for organ in scenario.organs:
            (changes.absent if scenario.effect == "absent" else changes.small)[organ] = scenario.reason
            if rng.random() < scenario.clip_rate:
                changes.clips.add(organ)
            if name.endswith("atrophy"):
                changes.volume[organ] = float(rng.uniform(*ATROPHY_VOLUME))
            elif name.endswith("renal_agenesis"):
                other = "right_kidney" if organ == "left_kidney" else "left_kidney"
                changes.volume[other] = float(rng.uniform(*HYPERTROPHY_VOLUME))
            elif name.endswith("partial_nephrectomy"):  # a polar resection keeps 65-85% of the kidney
                changes.resection[organ] = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.5))
            elif name == "partial_hepatectomy":  # the left lobe and the right lobe's medial 10-30%
                changes.resection[organ] = float(rng.uniform(0.3, 0.6))
            emptied = name == "partial_hepatectomy" or (organ.endswith("kidney") and scenario.effect == "absent")
            if emptied and rng.random() < DISPLACED_BOWEL_RATE:
                changes.bowel_bed.add(organ)
    return changes


def generate_phantom(seed: int, config: PhantomConfig | None = None, *, case_index: int = 0) -> Phantom:
    """Draw one abdominal CT (or MR-like) phantom.

    Fine-voxel scans (in-plane under about 1.07 mm) are drawn on a coarse grid and resampled
    (`mednets.data.phantom_grid`); coarser ones, the 64³ default included, voxel by voxel.

    Args:
        seed: dataset seed; with `case_index` it fixes every random choice (same inputs, same bytes).
        config: shape, spacing, absence rates, noise, mixed spacing, modality.
        case_index: index of the case in its dataset (cases are independent of how many are drawn).

    Returns:
        The `Phantom` (image ``[D, H, W]`` int16, HU or non-negative MR units; labels ``[D, H, W]`` uint8).
    """
    config = config or PhantomConfig()
    with reuse_freed_memory():  # full-size temporaries reuse freed pages instead of faulting fresh ones in
        return _generate(int(seed), config, int(case_index))


def _generate(seed: int, config: PhantomConfig, case_index: int) -> Phantom:
    rng = np.random.default_rng([seed, case_index])
    scenario_rng = np.random.default_rng([seed, case_index, 3])
    shape, spacing = case_geometry(seed, config, case_index=case_index)
    scenarios = _draw_scenarios(scenario_rng, config.absence_rates)
    changes = _plan_changes(scenarios, scenario_rng)

    z_offset = float(rng.uniform(-12.0, 12.0))  # ordinary variation of where the scan starts
    # Truncation puts the scan's top or bottom edge at a random level: from the top it loses the
    # oesophagus, adrenals, spleen and liver in turn; from the bottom the kidneys, gallbladder and pancreas.
    half_fov = (shape[0] - 1) / 2.0 * spacing[0]
    if "truncated_top" in scenarios:
        z_offset = float(scenario_rng.uniform(*TRUNCATED_TOP_EDGE_MM)) - half_fov
    if "truncated_bottom" in scenarios:
        z_offset = float(scenario_rng.uniform(*TRUNCATED_BOTTOM_EDGE_MM)) + half_fov
    grid = drawing_grid(shape, spacing) if uses_drawing_grid(spacing) else None
    if grid is None:
        canvas = Canvas(shape, spacing, z_offset, rng)
    else:
        canvas = Canvas(grid.coarse_shape, grid.coarse_spacing, z_offset, rng, axes=grid.axes(z_offset))
    size = float(rng.uniform(0.88, 1.08))  # in-plane patient size
    height = float(rng.uniform(0.92, 1.08))  # craniocaudal organ extent
    # Subcutaneous fat thickness, lean to obese; mixed-spacing datasets (clinical populations, full
    # field of view) reach 60 mm, bodies 230-370 mm wide; the 64³ phantoms keep 35 mm (320 mm field).
    fat_mm = float(rng.uniform(8.0, MIXED_MAX_FAT_MM if config.mixed_spacing else 35.0))
    visceral = float(rng.uniform(0.2, 0.8))  # fraction of the abdominal cavity that is fat, not bowel
    fine = smooth_noise(rng, canvas.shape, 1.0)
    coarse = _coarse_noise(rng, canvas.shape, 45.0, canvas.spacing)
    loops = _coarse_noise(rng, canvas.shape, 28.0, canvas.spacing)
    _draw_body(canvas, rng, size, height, fat_mm, visceral, fine, coarse, loops)
    drawn = _draw_organs(canvas, rng, size, height, changes, fine, loops)
    del fine, coarse, loops

    info: dict[str, Any] = {}
    if config.modality == "mr":
        image, info = _render_mr(canvas, grid, np.random.default_rng([seed, case_index, 2]))
    elif grid is None:
        # Partial-volume blur then correlated noise, as a CT reconstruction kernel would give.
        image = ndimage.gaussian_filter(canvas.hu, 0.6)
        image += np.float32(config.noise_hu) * smooth_noise(rng, shape, 0.5)
        image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    else:
        image = _render_fine_ct(canvas, grid, rng, config.noise_hu)
    labels = canvas.labels if grid is None else upsample_labels(canvas.labels, grid)
    del canvas

    absent, cut, small = _bookkeeping(labels, changes, scenarios, config.min_voxels)
    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [(shape[2] - 1) / 2 * sx, (shape[1] - 1) / 2 * sy, -(shape[0] - 1) / 2 * sz + z_offset]
    info = {
        "size_factor": round(size, 4),
        "subcutaneous_fat_mm": round(fat_mm, 2),
        "fov_shift_mm": round(z_offset, 2),
        **drawn,
        **info,
    }
    if config.mixed_spacing:
        info.update(shape=list(shape), spacing_mm=list(spacing))
    return Phantom(image, labels, affine, scenarios, absent, cut, info, small)


def case_geometry(
    seed: int, config: PhantomConfig, *, case_index: int = 0
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A case's array shape ``(D, H, W)`` and voxel size in mm, without drawing it.

    The config's, or with `mixed_spacing` drawn from a random stream of its own (seed, case index).
    """
    shape = tuple(int(n) for n in config.shape)
    if not config.mixed_spacing:
        return shape, config.spacing_mm  # type: ignore[return-value]
    rng = np.random.default_rng([int(seed), int(case_index), 1])
    in_plane = round(float(rng.uniform(*MIXED_IN_PLANE_MM)), 4)
    thickness = float(rng.choice(MIXED_SLICE_MM))
    coverage = float(rng.uniform(*MIXED_COVERAGE_MM))
    most = shape[0]
    slices = int(np.clip(round(coverage / thickness), min(MIXED_MIN_SLICES, most), most))
    return (slices, shape[1], shape[2]), (thickness, in_plane, in_plane)


def _render_fine_ct(canvas: Canvas, grid: DrawingGrid, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """The scan-sized int16 HU image from the coarse drawing: interpolated, then noise at full resolution."""
    image = upsample_intensities(blur_drawing(canvas.hu, grid), grid, fill=-1000.0)
    noise = box_noise(rng, grid.shape)
    noise *= np.float32(noise_hu)
    image += noise
    del noise
    np.rint(image, out=image)
    np.clip(image, -1024, 3071, out=image)
    return image.astype(np.int16)


def _render_mr(
    canvas: Canvas, grid: DrawingGrid | None, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, float]]:
    """The MR-like image of the drawn anatomy (`mednets.data.phantom_mr`) and the values drawn for it."""
    intensity = mr_intensity(canvas.hu, canvas.labels) * bias_field(rng, canvas.axes)
    if grid is None:
        image = ndimage.gaussian_filter(intensity, 0.6)
    else:
        image = upsample_intensities(blur_drawing(intensity, grid), grid, fill=0.0)
    return to_arbitrary_units(image, rng)


def _bookkeeping(
    labels: np.ndarray, changes: _Changes, scenarios: list[str], min_voxels: int
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """The record's absent, cut and small organs (each {organ: reason}); erases organs under `min_voxels`."""
    counts = np.bincount(labels.ravel(), minlength=len(anatomy.ORGANS) + 1)
    top = np.bincount(labels[-1].ravel(), minlength=counts.size)
    bottom = np.bincount(labels[0].ravel(), minlength=counts.size)
    if "truncated_top" in scenarios:
        fov_reason = SCENARIOS["truncated_top"][1]
    elif "truncated_bottom" in scenarios:
        fov_reason = SCENARIOS["truncated_bottom"][1]
    else:
        fov_reason = "outside the field of view"
    absent: dict[str, str] = {}
    cut: dict[str, str] = {}
    small: dict[str, str] = {}
    for o in anatomy.ORGANS:
        if o.name in changes.absent:
            absent[o.name] = changes.absent[o.name]
            continue
        if counts[o.id] < min_voxels:
            absent[o.name] = fov_reason
            if counts[o.id]:
                labels[labels == o.id] = 0  # a sliver below min_voxels is recorded absent, so it is erased
            continue
        if o.name in changes.small:
            small[o.name] = changes.small[o.name]
        if top[o.id] or bottom[o.id]:
            cut[o.name] = "cut by the field of view at the " + ("top" if top[o.id] else "bottom")
    return absent, cut, small


def _draw_body(
    canvas: Canvas, rng, size: float, height: float, fat_mm: float, visceral: float, fine, coarse, loops
) -> None:
    z, y, x = canvas.z, canvas.y, canvas.x
    # Body cross-section: an ellipse, flatter at the back (the patient lies on the table), wider at the pelvis.
    width = 118.0 * size * (1.0 + 0.06 * np.clip(-(z + 80.0) / 150.0, 0, 1))
    front, back = 92.0 * size, 88.0 * size
    cy = 10.0 * size
    depth = np.where(y < cy, front, back)

    def ellipse(shrink_x: float, shrink_front: float, shrink_back: float) -> np.ndarray:
        d = np.where(y < cy, front - shrink_front, back - shrink_back)
        return (np.abs(x / (width - shrink_x)) ** _P + np.abs((y - cy) / d) ** _P).astype(np.float32)

    fat_front, fat_side, fat_back = fat_mm, fat_mm * 0.9, fat_mm * 0.45
    outer = (
        np.abs(x / (width + fat_side)) ** _P + np.abs((y - cy) / (depth + np.where(y < cy, fat_front, fat_back))) ** _P
    )
    skin = outer <= 1.0
    canvas.hu[skin] = 30.0
    sub = (
        np.abs(x / (width + fat_side - 3.0)) ** _P
        + np.abs((y - cy) / (depth + np.where(y < cy, fat_front, fat_back) - 3.0)) ** _P
        <= 1.0
    )
    canvas.hu[sub] = -105.0 + 8.0 * fine[sub]
    muscle_wall = ellipse(0.0, 0.0, 0.0) <= 1.0
    canvas.hu[muscle_wall] = 48.0 + 5.0 * fine[muscle_wall]
    cavity = ellipse(14.0 * size, 12.0 * size, 14.0 * size) <= 1.0
    canvas.cavity = cavity  # organs are clipped to it

    # Diaphragm: two domes, lower at the back (posterior recesses) and sides; lungs above, abdomen below.
    diaphragm = np.maximum(
        (118.0 * height) - ((x + 55.0 * size) ** 2 + (y - 0.0) ** 2 + 0.6 * np.maximum(y, 0) ** 2) / 230.0,
        (108.0 * height) - ((x - 60.0 * size) ** 2 + (y - 10.0) ** 2 + 0.6 * np.maximum(y, 0) ** 2) / 230.0,
    )
    canvas.diaphragm = diaphragm
    abdomen = cavity & (z < diaphragm)
    thorax = cavity & (z >= diaphragm + 6.0)
    canvas.abdomen = abdomen
    # Visceral fat with bowel loops (soft tissue walls, fluid, gas) below the liver and stomach.
    # Bowel lies in the peritoneal cavity, in front of the retroperitoneum (kidneys sit in fat).
    # Loops are the band around a level set of smooth noise: in a slice they curve like bowel in cross-section.
    intraperitoneal = abdomen & (z < 35.0 * height) & (y < 20.0 * size + 8.0 * coarse)
    bowel = intraperitoneal & (np.abs(loops) < 0.15 + 0.3 * (1.0 - visceral))
    canvas.hu[abdomen] = -95.0 + 10.0 * fine[abdomen]
    mesenteric_vessels = intraperitoneal & (fine > 2.3)  # small enhancing vessels dotted through the fat
    canvas.hu[mesenteric_vessels] = 140.0
    canvas.hu[bowel] = np.where(np.abs(loops[bowel]) < 0.12, 12.0, 42.0) + 8.0 * fine[bowel]  # fluid inside the wall
    gas = bowel & (fine > 2.0) & (coarse > 0.0)
    canvas.hu[gas] = -850.0
    # Colon frame: ascending (right), transverse (front), descending (left), with mottled gas and stool.
    h = height
    colon = [(-150 * h, 30, -95 * size), (-10 * h, 20, -100 * size), (10 * h, -30, -85 * size), (-5 * h, -62 * size, -20),
             (20 * h, -55 * size, 50), (45 * h, -5, 90 * size), (0, 30, 100 * size), (-150 * h, 30, 95 * size)]  # fmt: skip
    box, m, _ = canvas.tube(colon, [22.0] * len(colon))
    if box is not None:
        inside = m <= 1.0
        stool = np.where(fine[box] > 0.8, -900.0, -40.0 + 30.0 * fine[box]).astype(np.float32)
        canvas.paint(box, inside, stool, allowed=abdomen)
        canvas.paint(box, (m > 0.82) & inside, 40.0, allowed=abdomen)
    # Lungs with a few vessels, heart on the central tendon.
    canvas.hu[thorax] = -860.0 + 25.0 * fine[thorax]
    canvas.hu[thorax & (fine > 2.0)] = -350.0
    canvas.hu[cavity & (z >= diaphragm) & (z < diaphragm + 6.0)] = 45.0
    box, q = canvas.ellipsoid((175.0 * h, -30.0 * size, 12.0 * size), (60.0 * h, 55.0 * size, 68.0 * size))
    if box is not None:
        heart = (q <= 1.0) & (z[box] > diaphragm[box] + 3.0)
        canvas.paint(box, heart & (q > 0.75), 65.0)
        canvas.paint(box, heart & (q <= 0.75), 135.0 + 5 * fine[box])
    # Pelvis at the bottom: bladder, sacrum, iliac wings, femoral heads.
    box, q = canvas.ellipsoid((-245.0 * h, -45.0 * size, 0.0), (40.0, 40.0 * size, 55.0 * size))
    canvas.paint(box, q <= 1.0, 10.0, allowed=cavity)
    box, q = canvas.ellipsoid((-200.0 * h, 70.0 * size, 0.0), (60.0, 22.0 * size, 45.0 * size))
    canvas.paint(box, q <= 1.0, 320.0)
    for side in (-1.0, 1.0):
        box, q = canvas.ellipsoid((-185.0 * h, 35.0 * size, side * 80.0 * size), (55.0, 55.0 * size, 40.0 * size))
        if box is not None:
            plate = (q <= 1.0) & (q >= 0.72) & (y[box] > 0.0)
            canvas.paint(box, plate, 420.0)
        box, q = canvas.ellipsoid((-270.0 * h, 5.0 * size, side * 88.0 * size), (24.0, 24.0, 24.0))
        canvas.paint(box, q <= 1.0, 380.0)
    _draw_spine_and_ribs(canvas, size, height, fine, cavity, muscle_wall, diaphragm)


def _draw_spine_and_ribs(canvas: Canvas, size: float, height: float, fine, cavity, muscle_wall, diaphragm) -> None:
    z, y, x = canvas.z, canvas.y, canvas.x
    spine_y = 52.0 * size
    # Paraspinal and psoas muscles first, bone on top.
    muscles = np.zeros(canvas.shape, dtype=bool)
    for side in (-1.0, 1.0):
        paraspinal = ((x - side * 33.0 * size) / (24.0 * size)) ** 2 + ((y - 86.0 * size) / (17.0 * size)) ** 2 <= 1.0
        region = paraspinal & muscle_wall
        canvas.hu[region] = 50.0 + 5.0 * fine[region]
        depth = np.clip((20.0 - z) / 140.0, 0.0, 1.0)  # psoas grows from L1 downwards
        radius = 26.0 * size * depth
        psoas = ((x - side * (30.0 + 22.0 * depth) * size) ** 2 + (y - (48.0 - 12.0 * depth) * size) ** 2) <= radius**2
        psoas &= cavity
        canvas.hu[psoas] = 50.0 + 5.0 * fine[psoas]
        muscles |= paraspinal | psoas
    phase = np.mod((z + 8.0) / (34.0 * height), 1.0)  # position within one vertebra + disc
    body = (x / (21.0 * size)) ** 2 + ((y - spine_y) / (16.0 * size)) ** 2
    vertebra = body <= 1.0
    disc = vertebra & (phase < 0.2)
    canvas.hu[vertebra] = np.where(body[vertebra] > 0.62, 650.0, 220.0 + 25.0 * fine[vertebra])
    canvas.hu[disc] = 85.0
    canal_r = np.sqrt(x**2 + (y - (spine_y + 28.0 * size)) ** 2)
    arch = (canal_r > 10.0 * size) & (canal_r < 17.0 * size) & (y > spine_y + 14.0 * size) & (phase > 0.25)
    canvas.hu[canal_r <= 10.0 * size] = 15.0
    canvas.hu[arch] = 480.0
    spinous = (
        (np.abs(x) < 5.0) & (y > spine_y + 40.0 * size) & (y < spine_y + 62.0 * size) & (phase > 0.35) & (phase < 0.85)
    )
    transverse = (
        (np.abs(np.abs(x) - 32.0 * size) < 12.0 * size)
        & (np.abs(y - spine_y - 26.0 * size) < 4.5)
        & (phase > 0.4)
        & (phase < 0.75)
        & (z < 40.0)
    )
    canvas.hu[spinous | transverse] = 480.0
    canvas.forbidden = vertebra | (canal_r < 17.0 * size) | muscles
    # Ribs: slanted bands in the body wall, down to the costal margin (low at the back, high in front).
    cavity_metric = (
        np.abs(x / (104.0 * size)) ** _P
        + np.abs((y - 10.0 * size) / (np.where(y < 10.0 * size, 80.0, 74.0) * size)) ** _P
    )
    ring = (cavity_metric > 1.02) & (cavity_metric < 1.2) & muscle_wall
    sin_theta = np.clip((y - 10.0 * size) / np.maximum(np.sqrt(x**2 + (y - 10.0 * size) ** 2), 1.0), -1.0, 1.0)
    costal_margin = (-35.0 + 135.0 * ((1.0 - sin_theta) / 2.0) ** 2) * height
    # Each rib descends from the spine round to the front: its height falls with the arc from the back.
    arc_mm = np.arccos(sin_theta) * 110.0 * size
    rib_phase = np.mod((z + 0.38 * arc_mm) / (30.0 * height), 1.0)
    ribs = ring & (z > costal_margin) & (rib_phase < 0.26) & ~((np.abs(x) < 30.0 * size) & (y > 40.0 * size))
    canvas.hu[ribs] = np.where(sin_theta[ribs] < -0.85, 160.0, 560.0)  # cartilage in front, bone elsewhere


def _draw_clip(canvas: Canvas, point, allowed: np.ndarray) -> bool:
    """Paint a metal surgical clip (about 5 mm) at `point` (z, y, x mm); whether any of it is in view.

    At least the voxel nearest to the point is painted, so a clip shows at every voxel size.
    """
    radius = 2.5
    box, q = canvas.ellipsoid(point, (radius, radius, radius))
    inside = allowed[box]
    if not inside.any():
        return False
    nearest = (0.5 * float(np.linalg.norm(canvas.spacing)) / radius) ** 2  # half a voxel diagonal away at most
    mask = inside & (q <= max(1.0, min(float(q[inside].min()), nearest)))
    canvas.paint(box, mask, CLIP_HU)
    return bool(mask.any())


def _fill_with_bowel(canvas: Canvas, box, mask: np.ndarray, fine: np.ndarray, loops: np.ndarray) -> bool:
    """Paint bowel loops where `mask` (over `box`) holds; whether any voxel was painted.

    Walls and fluid alternate along the level sets of `loops`, with a little gas and mesenteric fat in
    between, so an emptied organ bed looks like displaced bowel, not a fat-density hole.
    """
    texture = fine[box]
    hu = np.where(np.mod(2.5 * loops[box], 1.0) < 0.45, 42.0, 15.0) + 6.0 * texture
    hu = np.where(texture < -1.0, -95.0, np.where(texture > 1.8, -850.0, hu)).astype(np.float32)
    canvas.paint(box, mask, hu)
    return bool(mask.any())


def _draw_organs(
    canvas: Canvas, rng, size: float, height: float, changes: _Changes, fine, loops
) -> dict[str, list[str]]:
    """Paint the 13 organs, the vessels and what the scenarios leave; the record's ``clips`` and ``displaced_bowel``.

    Every random draw happens whatever the scenarios, so they change only the organs they touch.
    """
    s, h = size, height
    z, y, _x = canvas.z, canvas.y, canvas.x
    allowed = canvas.abdomen & ~canvas.forbidden
    clip_sites: list[tuple[str, np.ndarray]] = []  # painted last: metal lies on top of everything
    bowel_beds: list[str] = []

    def jitter(point, amount: float = 6.0):
        return np.asarray(point, dtype=np.float32) + rng.normal(0.0, amount, 3).astype(np.float32)

    def scale(base: float = 0.1) -> float:
        return float(np.clip(rng.normal(1.0, base), 0.8, 1.2))

    def draw(name: str) -> bool:
        return name not in changes.absent

    # Liver: right lobe + left lobe, under the right dome; hepatic veins bright inside it. A partial
    # hepatectomy removes all beyond a sagittal plane (the left lobe) and bowel may move into its bed.
    k = scale()
    right_lobe = jitter((48.0 * h, 5.0 * s, -58.0 * s))
    right_semi = np.array([76.0 * h, 86.0 * s, 84.0 * s]) * k
    box, q = canvas.ellipsoid(right_lobe, right_semi, rotation("y", -12.0))
    liver_mask = np.zeros(canvas.shape, dtype=bool)
    liver_mask[box] |= q <= 1.0
    box, q = canvas.ellipsoid(
        jitter((72.0 * h, -42.0 * s, 10.0 * s)), np.array([34.0 * h, 36.0 * s, 62.0 * s]) * k, rotation("z", 12.0)
    )
    liver_mask[box] |= q <= 1.0
    liver_mask &= allowed & (z < canvas.diaphragm - 2.0)
    resection = changes.resection.get("liver")
    if resection is not None:
        margin = right_lobe + np.array([0.0, 0.0, resection * right_semi[2]], dtype=np.float32)
        bed = liver_mask & (canvas.x >= margin[2])
        liver_mask &= ~bed
        if "liver" in changes.bowel_bed and _fill_with_bowel(canvas, (slice(None),) * 3, bed, fine, loops):
            bowel_beds.append("liver")
        if "liver" in changes.clips:
            clip_sites.append(("liver", margin))
    canvas.hu[liver_mask] = 60.0 + 5.0 * fine[liver_mask]
    canvas.labels[liver_mask] = _ID["liver"]
    hepatic = canvas.labels == _ID["liver"]
    for end in ((70.0 * h, -10.0 * s, -95.0 * s), (80.0 * h, -45.0 * s, -40.0 * s), (90.0 * h, -40.0 * s, 15.0 * s)):
        box, m, _ = canvas.tube([(105.0 * h, 15.0 * s, -25.0 * s), end], [5.0, 3.5])
        if box is not None:
            canvas.paint(box, m <= 1.0, 150.0, allowed=hepatic)

    # Spleen: posterior left, long axis along the ribs.
    k = scale() * changes.volume.get("spleen", 1.0) ** (1.0 / 3.0)
    spleen_centre = jitter((50.0 * h, 46.0 * s, 80.0 * s))
    if draw("spleen"):
        box, q = canvas.ellipsoid(spleen_centre, np.array([56.0 * h, 52.0 * s, 26.0 * s]) * k, rotation("z", 40.0))
        canvas.paint(box, q <= 1.0, 50.0 + 4.0 * fine[box], _ID["spleen"], allowed & (z < canvas.diaphragm - 2.0))
    elif "spleen" in changes.clips:  # on the splenic vessels' stump, beyond the ligated vein
        clip_sites.append(("spleen", np.array([28.0 * h, 14.0 * s, 37.0 * s], dtype=np.float32)))

    # Esophagus: a collapsed muscular tube in periesophageal fat down the posterior mediastinum to the
    # gastro-oesophageal junction; in some patients a thin air lumen (contrast CT: median 10-80 HU).
    lumen = float(rng.uniform(0.12, 0.25)) * float(rng.random() < 0.4)  # both drawn: the stream stays aligned
    box, m, _ = canvas.tube(
        [
            (320.0, 28.0 * s, 5.0),
            (130.0 * h, 22.0 * s, 12.0 * s),
            (98.0 * h, 14.0 * s, 28.0 * s),
            (86.0 * h, 12.0 * s, 40.0 * s),
        ],
        [9.0, 9.0, 9.0, 9.0],
    )
    if box is not None:  # a 7 mm fat sleeve: bare lung around it would pull its blurred HU to about -80
        canvas.paint(box, m <= 16.0 / 9.0, -70.0 + 10.0 * fine[box], allowed=canvas.cavity & (canvas.labels == 0))
        wall = np.where(m < lumen, -800.0, 50.0 + 4.0 * fine[box]).astype(np.float32)
        canvas.paint(box, m <= 1.0, wall, _ID["esophagus"], canvas.cavity)

    # Stomach: fundus under the left dome, body, antrum crossing to the pylorus; wall, fluid, gas on top.
    k = scale()
    stomach = [
        jitter(p, 4.0)
        for p in (
            (92.0 * h, 20.0 * s, 48.0 * s),
            (62.0 * h, -18.0 * s, 64.0 * s),
            (34.0 * h, -45.0 * s, 45.0 * s),
            (20.0 * h, -55.0 * s, 5.0 * s),
            (22.0 * h, -40.0 * s, -22.0 * s),
        )
    ]
    box, m, radius = canvas.tube(stomach, np.array([36.0, 34.0, 28.0, 20.0, 12.0]) * k)
    if box is not None:
        inside = (m <= 1.0) & allowed[box] & (z[box] < canvas.diaphragm[box] - 2.0)
        ys = y[box][inside]
        gas_level = float(ys.min() + rng.uniform(0.1, 0.35) * (ys.max() - ys.min())) if ys.size else 0.0
        wall = m > 1.0 - 5.0 / np.maximum(radius, 1.0)
        contents = np.where(y[box] < gas_level, -950.0, 18.0 + 8.0 * fine[box])
        canvas.paint(box, inside, np.where(wall, 68.0, contents).astype(np.float32), _ID["stomach"])

    # Pancreas: head in the duodenal C-loop, neck, body over the aorta, tail to the splenic hilum; lobulated.
    k = scale()
    pancreas = [
        jitter(p, 4.0)
        for p in (
            (-5.0 * h, -8.0 * s, -32.0 * s),
            (12.0 * h, -24.0 * s, -8.0 * s),
            (22.0 * h, -12.0 * s, 28.0 * s),
            (40.0 * h, 18.0 * s, 62.0 * s),
        )
    ]
    box, m, _ = canvas.tube(pancreas, np.array([18.0, 13.0, 13.0, 11.0]) * k)
    if box is not None:
        lobules = np.where(fine[box] < -1.3, -40.0, 45.0 + 6.0 * fine[box]).astype(np.float32)
        canvas.paint(box, m <= 1.0, lobules, _ID["pancreas"], allowed)

    # Kidneys: cortex brighter than medulla, sinus fat at the hilum; upper poles medial and posterior.
    # An empty bed mostly fills with bowel; a partial nephrectomy cuts a pole off by a plane.
    for name, side, zc in (("right_kidney", -1.0, -22.0), ("left_kidney", 1.0, -6.0)):
        k = scale(0.08) * changes.volume.get(name, 1.0) ** (1.0 / 3.0)
        center = jitter((zc * h, 56.0 * s, side * 66.0 * s), 5.0)
        turn = rotation("z", side * 30.0) @ rotation("y", side * 14.0)
        semi = np.array([55.0 * h, 23.0 * s, 28.0 * s]) * k
        hilum = center + np.array([0.0, -8.0 * s, -side * 26.0 * s], dtype=np.float32)
        if not draw(name):
            if name in changes.bowel_bed:
                box, q = canvas.ellipsoid(center, semi * 1.15, turn)
                if _fill_with_bowel(canvas, box, (q <= 1.0) & allowed[box] & (canvas.labels[box] == 0), fine, loops):
                    bowel_beds.append(name)
            if name in changes.clips:  # on the renal artery and vein stumps
                stumps = ((4.0, 0.0, -side * 6.0), (-4.0, 3.0, -side * 9.0))
                clip_sites += [(name, hilum + np.array(offset, dtype=np.float32)) for offset in stumps]
            continue
        box, q = canvas.ellipsoid(center, semi, turn)
        kidney = q <= 1.0
        plane = changes.resection.get(name)
        if plane is not None:
            offset = [c - p for c, p in zip(canvas.coords(box), center, strict=True)]
            along = sum(float(r) * d for r, d in zip(turn[0], offset, strict=True)) / semi[0]  # long axis
            kidney &= math.copysign(1.0, plane) * along <= abs(plane)
            if name in changes.clips:
                clip_sites.append((name, center + (plane * semi[0] * turn[0]).astype(np.float32)))
        tissue = np.where(q > 0.5, 175.0, 85.0).astype(np.float32) + 4.0 * fine[box]
        sinus_box, sinus_q = canvas.ellipsoid(
            center + np.array([0.0, -6.0 * s, -side * 16.0 * s]), (22.0 * h, 9.0 * s, 10.0 * s)
        )
        canvas.paint(box, kidney, tissue, _ID[name], allowed)
        canvas.paint(sinus_box, sinus_q <= 1.0, -60.0, allowed=canvas.labels == _ID[name])
        box, m, _ = canvas.tube(
            [hilum, (-6.0 * h, 10.0 * s, (-24.0 if side < 0 else 4.0) * s), (-6.0 * h, 14.0 * s, -24.0 * s)],
            [5.0, 5.0, 5.0],
        )
        canvas.paint(box, m <= 1.0, 160.0, allowed=allowed & (canvas.labels == 0))  # renal vein to the IVC

    # Adrenal glands: thin inverted-V slabs above and medial to the kidneys' upper poles.
    for name, center in (
        ("right_adrenal", (48.0 * h, 42.0 * s, -36.0 * s)),
        ("left_adrenal", (50.0 * h, 34.0 * s, 34.0 * s)),
    ):
        c = jitter(center, 3.0)
        if not draw(name):
            continue
        for tilt in (-28.0, 28.0):
            box, q = canvas.ellipsoid(
                c + np.array([-8.0, 0.0, 0.0]), (18.0 * h, 13.0 * s, 4.5 * s), rotation("y", tilt)
            )
            canvas.paint(box, q <= 1.0, 40.0, _ID[name], allowed)

    # Gallbladder: pear under the liver, bile near water; after cholecystectomy a clip may stay on the cystic duct.
    gb_center = jitter((2.0 * h, -42.0 * s, -52.0 * s), 5.0)
    k = scale(0.15)
    if draw("gallbladder"):
        box, q = canvas.ellipsoid(gb_center, np.array([36.0 * h, 17.0 * s, 17.0 * s]) * k, rotation("x", 35.0))
        canvas.paint(box, q <= 1.0, np.where(q > 0.7, 38.0, 10.0 + 3.0 * fine[box]), _ID["gallbladder"], allowed)
    elif "gallbladder" in changes.clips:
        clip_sites.append(("gallbladder", gb_center + np.array([30.0, 10.0, 5.0], dtype=np.float32)))

    # Vessels last: aorta, IVC (through the liver), portal and splenic vein, and unlabelled branches.
    box, m, _ = canvas.tube(
        [
            (320.0, 30.0 * s, 28.0 * s),
            (100.0 * h, 26.0 * s, 16.0 * s),
            (0.0, 22.0 * s, 8.0 * s),
            (-110.0 * h, 22.0 * s, 4.0 * s),
        ],
        np.full(4, 11.0 * s),
    )
    canvas.paint(box, m <= 1.0, 205.0 + 5.0 * fine[box], _ID["aorta"], canvas.cavity & ~canvas.forbidden)
    for side in (-1.0, 1.0):  # common iliac arteries and veins
        box, m, _ = canvas.tube(
            [
                (-110.0 * h, 22.0 * s, 4.0 * s),
                (-190.0 * h, 20.0 * s, side * 40.0 * s),
                (-260.0 * h, 10.0 * s, side * 65.0 * s),
            ],
            [6.0, 6.0, 6.0],
        )
        canvas.paint(box, m <= 1.0, 200.0, allowed=canvas.cavity & (canvas.labels == 0))
        box, m, _ = canvas.tube(
            [
                (-115.0 * h, 30.0 * s, -18.0 * s),
                (-195.0 * h, 32.0 * s, side * 40.0 * s),
                (-265.0 * h, 20.0 * s, side * 70.0 * s),
            ],
            [7.0, 7.0, 7.0],
        )
        canvas.paint(box, m <= 1.0, 150.0, allowed=canvas.cavity & (canvas.labels == 0))
    box, m, _ = canvas.tube(
        [(5.0 * h, 12.0 * s, 8.0 * s), (-10.0 * h, -10.0 * s, 6.0 * s), (-90.0 * h, -22.0 * s, 0.0)], [4.0, 4.0, 3.5]
    )
    canvas.paint(box, m <= 1.0, 200.0, allowed=allowed & (canvas.labels == 0))  # superior mesenteric artery
    box, m, _ = canvas.tube(
        [
            (-115.0 * h, 30.0 * s, -18.0 * s),
            (0.0, 16.0 * s, -24.0 * s),
            (60.0 * h, 22.0 * s, -30.0 * s),
            (112.0 * h, 10.0 * s, -26.0 * s),
            (128.0 * h, -5.0 * s, -18.0 * s),
        ],
        np.array([10.0, 11.0, 11.0, 12.0, 12.0]) * s,
    )
    canvas.paint(box, m <= 1.0, 155.0 + 5.0 * fine[box], _ID["inferior_vena_cava"], canvas.cavity & ~canvas.forbidden)
    confluence = (16.0 * h, -10.0 * s, -4.0 * s)
    portal = [
        (-30.0 * h, -22.0 * s, -4.0 * s),
        confluence,
        (38.0 * h, -4.0 * s, -28.0 * s),
        (50.0 * h, 2.0 * s, -42.0 * s),
    ]
    box, m, _ = canvas.tube(portal[1:], [7.0, 7.0, 6.0])
    canvas.paint(box, m <= 1.0, 175.0, _ID["portal_splenic_vein"], canvas.cavity & ~canvas.forbidden)
    box, m, _ = canvas.tube(portal[:2], [5.0, 6.0])  # superior mesenteric vein: unlabelled
    canvas.paint(box, m <= 1.0, 170.0, allowed=allowed & (canvas.labels == 0))
    splenic = [
        confluence,
        (24.0 * h, 8.0 * s, 30.0 * s),
        (44.0 * h, 36.0 * s, 62.0 * s),
        (52.0 * h, 46.0 * s, 74.0 * s),
    ]
    if not draw("spleen"):
        splenic = splenic[:2]  # ligated at splenectomy
    box, m, _ = canvas.tube(splenic, [5.0] * len(splenic))
    canvas.paint(box, m <= 1.0, 175.0, _ID["portal_splenic_vein"], allowed)
    clipped = [organ for organ, point in clip_sites if _draw_clip(canvas, point, allowed)]
    return {"clips": sorted(set(clipped)), "displaced_bowel": bowel_beds}


def write_phantom_dataset(
    out: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    config: PhantomConfig | Any = None,
    *,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Generate `n` phantoms into a dataset folder (docs/dataset_format.md) and return its path.

    `config` is a `PhantomConfig` (abdomen) or another kind's config with the same two methods,
    `generate(seed, case_index)` and `dataset_info(seed)` (`phantom_thorax.ThoraxConfig`).

    Writes ``imagesTr/phantom_XXX_0000.nii.gz``, ``labelsTr/phantom_XXX.nii.gz`` and ``dataset.json``
    with ``labels`` from `mednets.anatomy`, the generator settings and, per case (`Phantom.record`), the
    scenarios, the absent and the small present organs with their reasons, the organs cut by the field
    of view, clips and displaced bowel, and (mixed spacing) the case's shape and spacing. Same arguments, same bytes, whatever the number of workers.

    Args:
        workers: cases drawn at once in worker processes (at most `n`); 1 draws them in this process.
        progress: show a progress bar (more than one case).

    Raises:
        ConfigError: `n` < 1, `workers` < 1, or `out` is not empty and `overwrite` is False.
    """
    config = config or PhantomConfig()
    if n < 1:
        raise ConfigError("number of phantoms must be at least 1", source="--n", got=n)
    if workers < 1:
        raise ConfigError("number of workers must be at least 1", source="--workers", got=workers)
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError("output folder is not empty (pass overwrite to replace it)", source=str(root))
        for name in ("imagesTr", "labelsTr", "imagesTs"):
            shutil.rmtree(root / name, ignore_errors=True)
        (root / "dataset.json").unlink(missing_ok=True)
    from tqdm.auto import tqdm

    records: list[dict[str, Any] | None] = [None] * n
    bar = tqdm(total=n, desc="phantoms", unit="case", disable=not progress or n == 1)
    workers = min(workers, n)
    if workers == 1:
        with reuse_freed_memory():
            for index in range(n):
                records[index] = _write_case(root, seed, config, index)
                bar.update()
    else:
        # spawn: a forked child of a process whose OpenMP threads already ran can hang in them.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_write_case, root, seed, config, index): index for index in range(n)}
            try:
                for future in as_completed(futures):
                    records[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    info = {
        **config.dataset_info(seed),
        "numTraining": n,
        "file_ending": ".nii.gz",
        "min_voxels": config.min_voxels,
        "cases": {f"phantom_{index:03d}": record for index, record in enumerate(records)},
    }
    atomic_write_text(root / "dataset.json", json.dumps(info, indent=2) + "\n")
    return root


def default_workers(n: int, config: PhantomConfig) -> int:
    """Worker processes for `n` cases: the machine's cores, at most one per case and one per 8M voxels
    to draw (a worker takes about a second to start: 64³ datasets of a few dozen cases draw faster alone)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    voxels = n * math.prod(config.shape)
    return max(1, min(cores, n, voxels // 8_000_000))


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # one core per worker: torch's interpolation would take them all


def _write_case(root: Path, seed: int, config: Any, index: int) -> dict[str, Any]:
    """Draw case `index` and write its image and label files (each atomically); its dataset.json record."""
    from mednets.data.io import write_volume
    from mednets.data.volume import Volume

    case_id = f"phantom_{index:03d}"
    phantom = config.generate(seed, index)
    write_volume(Volume(phantom.image, phantom.affine), root / "imagesTr" / f"{case_id}_0000.nii.gz")
    write_volume(Volume(phantom.labels, phantom.affine), root / "labelsTr" / f"{case_id}.nii.gz")
    return phantom.record()
