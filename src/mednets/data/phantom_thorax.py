"""Synthetic thoraco-lumbar CT: lungs, heart, aorta, trachea, oesophagus and vertebrae T10-L5, with absences of their own.

Unlike the abdominal phantom (`mednets.data.phantoms`) in structures (two large lungs, eight small repeated
vertebrae), voxel size and scenarios, it shows whether a model configuration is tuned to the abdominal one.
Same conventions (and its `Canvas`): implicit shapes on deformed patient coordinates in mm, LPS+ (z = 0 at
the T12/L1 disc); array ``[D, H, W] = [z, y, x]``, RAS affine ``diag(-sx, -sy, sz)``; partial-volume blur,
correlated noise, int16 HU. Default field of view 420 mm (z) by 360 mm (6.56 x 5.63 x 5.63 mm voxels at
64³), sacrum to carina. HU (venous phase): lung -860 with vessels, fat -100, muscle 50, myocardium 70 around
blood 150, aorta 180, airway lumen -1000, bone 220-650, discs 85, fluid 20, staples 3000.

Scenarios (each with its own rate): left or right pneumonectomy (lung absent, mediastinum shifted towards
the empty hemithorax, which holds fluid, hemidiaphragm raised, stapled bronchial stump), left or right lower
lobectomy (lung present, recorded ``small``: volume loss, staple lines), a congenitally missing vertebra
(T12: 11 thoracic vertebrae, or L5: 4 lumbar; the column one vertebra shorter), fused vertebrae (a block
vertebra: the lower label absent), thorax-only or abdomen-only fields of view at random levels. Structures
under `min_voxels` voxels are erased from the labels and recorded absent: `Phantom.record` and labels agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from mednets.data.dataset import DEFAULT_MIN_VOXELS
from mednets.data.phantoms import Canvas, Phantom, check_rates, rotation, smooth_noise
from mednets.errors import ConfigError

__all__ = ["DEFAULT_ABSENCE_RATES", "SCENARIOS", "STRUCTURES", "VERTEBRAE", "ThoraxConfig", "generate_thorax_phantom"]

VERTEBRAE = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
# Label ids are positions in this tuple, from 1.
STRUCTURES: tuple[str, ...] = (
    "left_lung", "right_lung", "heart", "aorta", "trachea", "esophagus", *(f"vertebrae_{v}" for v in VERTEBRAE),
)  # fmt: skip
_ID = {name: index for index, name in enumerate(STRUCTURES, 1)}
# Scenario -> what it is; the reasons written for absent structures are built from it.
SCENARIOS: dict[str, str] = {
    "left_pneumonectomy": "left pneumonectomy", "right_pneumonectomy": "right pneumonectomy",
    "left_lobectomy": "lower lobectomy (smaller lung)", "right_lobectomy": "lower lobectomy (smaller lung)",
    "missing_vertebra": "congenitally missing vertebra", "fused_vertebrae": "block vertebra",
    "thorax_only": "outside the field of view (thorax only)", "abdomen_only": "outside the field of view (abdomen only)",
}  # fmt: skip
DEFAULT_ABSENCE_RATES: dict[str, float] = {
    "left_pneumonectomy": 0.08, "right_pneumonectomy": 0.08, "left_lobectomy": 0.06, "right_lobectomy": 0.06,
    "missing_vertebra": 0.1, "fused_vertebrae": 0.1, "thorax_only": 0.12, "abdomen_only": 0.12,
}  # fmt: skip
# At most one scenario of each group per patient.
_EXCLUSIVE = (("left_pneumonectomy", "right_pneumonectomy", "left_lobectomy", "right_lobectomy"),
              ("missing_vertebra", "fused_vertebrae"), ("thorax_only", "abdomen_only"))  # fmt: skip
DEFAULT_FOV_MM = (420.0, 360.0, 360.0)  # (z, y, x): sacrum to carina, the chest's width with margin
_FOV_CENTRE_MM = 15.0  # z of the field of view's centre above the T12/L1 disc
_P = 2.6  # superellipse exponent of body sections
_STAPLE_HU = 6000.0  # titanium; partial volume and blur bring it down to a few thousand HU


@dataclass(frozen=True)
class ThoraxConfig:
    """How thorax phantoms are drawn.

    Attributes:
        shape: array shape ``(D, H, W)``.
        spacing: voxel size in mm ``(D, H, W)``; None gives the `DEFAULT_FOV_MM` field of view.
        absence_rates: probability of each scenario of `SCENARIOS` per case.
        noise_hu: standard deviation of the image noise in HU.
        min_voxels: a structure with fewer voxels is recorded absent and erased from the labels.
    """

    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] | None = None
    absence_rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ABSENCE_RATES))
    noise_hu: float = 12.0
    min_voxels: int = DEFAULT_MIN_VOXELS

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ConfigError("phantom shape must be 3 sizes of at least 8", source="shape", got=self.shape)
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError("spacing must be 3 positive sizes in mm", source="spacing", got=self.spacing)
        check_rates(self.absence_rates, SCENARIOS)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        if self.spacing is not None:
            return tuple(float(s) for s in self.spacing)  # type: ignore[return-value]
        return tuple(fov / n for fov, n in zip(DEFAULT_FOV_MM, self.shape, strict=True))  # type: ignore[return-value]

    def generate(self, seed: int, case_index: int) -> Phantom:
        """Case `case_index` of the dataset drawn with `seed` (`generate_thorax_phantom`)."""
        return generate_thorax_phantom(seed, self, case_index=case_index)

    def dataset_info(self, seed: int) -> dict[str, Any]:
        """dataset.json's description of these phantoms (`phantoms.write_phantom_dataset` writes them)."""
        generator = {"kind": "thorax", "seed": int(seed), "shape": list(self.shape),
                     "spacing_mm": [round(v, 6) for v in self.spacing_mm], "noise_hu": self.noise_hu,
                     "absence_rates": {k: self.absence_rates.get(k, 0.0) for k in SCENARIOS}}  # fmt: skip
        return {"name": "mednets_thorax_phantoms", "channel_names": {"0": "CT"}, "labels": {"background": 0, **_ID},
                "description": "Synthetic contrast-enhanced thoraco-lumbar CT (mednets.data.phantom_thorax), HU, LPS",
                "generator": generator}  # fmt: skip


@dataclass
class _Plan:
    """What the case's scenarios change in the drawing (drawn from their own random stream)."""

    removed: dict[str, str] = field(default_factory=dict)
    small: dict[str, str] = field(default_factory=dict)
    shift_mm: float = 0.0  # mediastinal shift along x (+: towards the patient's left)
    raised_mm: dict[int, float] = field(default_factory=lambda: {1: 0.0, -1: 0.0})  # hemidiaphragm by side
    empty_side: int = 0  # pneumonectomy side (+1 left, -1 right)
    lobectomy_side: int = 0
    missing: str | None = None
    fused: str | None = None  # the upper vertebra of a block
    fluid_level_mm: float = -1000.0  # y in front of which a pneumonectomy space holds air (none by default)
    fov_shift_mm: float = 0.0


def _plan(rng: np.random.Generator, rates: dict[str, float], fov_z: float) -> tuple[list[str], _Plan]:
    chosen = [name for name in SCENARIOS if rng.random() < rates.get(name, 0.0)]
    for group in _EXCLUSIVE:
        clash = [name for name in chosen if name in group]
        if len(clash) > 1:
            keep = clash[int(rng.integers(len(clash)))]
            chosen = [name for name in chosen if name not in group or name == keep]
    plan = _Plan()
    for side_name, side in (("left", 1), ("right", -1)):
        if f"{side_name}_pneumonectomy" in chosen:
            plan.removed[f"{side_name}_lung"] = SCENARIOS[f"{side_name}_pneumonectomy"]
            plan.empty_side, plan.shift_mm = side, side * float(rng.uniform(20.0, 40.0))
            plan.raised_mm[side] = float(rng.uniform(10.0, 25.0))
            if rng.random() < 0.4:  # early after surgery air remains in front of the fluid
                plan.fluid_level_mm = float(rng.uniform(-70.0, -30.0))
        if f"{side_name}_lobectomy" in chosen:  # volume loss: hemidiaphragm up, mediastinum across
            plan.small[f"{side_name}_lung"] = SCENARIOS[f"{side_name}_lobectomy"]
            plan.lobectomy_side, plan.shift_mm = side, side * float(rng.uniform(5.0, 12.0))
            plan.raised_mm[side] = float(rng.uniform(25.0, 45.0))
    if "missing_vertebra" in chosen:
        plan.missing = "T12" if rng.random() < 0.5 else "L5"
        count = "11 thoracic" if plan.missing == "T12" else "4 lumbar"
        plan.removed[f"vertebrae_{plan.missing}"] = f"{SCENARIOS['missing_vertebra']} ({count} vertebrae)"
    if "fused_vertebrae" in chosen:
        index = int(rng.integers(len(VERTEBRAE) - 1))
        plan.fused = VERTEBRAE[index]
        plan.removed[f"vertebrae_{VERTEBRAE[index + 1]}"] = f"fused with {plan.fused} ({SCENARIOS['fused_vertebrae']})"
    if "thorax_only" in chosen:  # the scan ends between L1 and L3: lower vertebrae outside
        plan.fov_shift_mm = float(rng.uniform(0.22, 0.4)) * fov_z
    if "abdomen_only" in chosen:  # the scan starts between T8 and L1: airways, heart, lungs go
        plan.fov_shift_mm = -float(rng.uniform(0.3, 0.5)) * fov_z
    return chosen, plan


def _column(height: float, plan: _Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertebral segments from C3 down: bottom z (mm, descending), label id (0: unlabelled) and disc height."""
    names = [f"C{i}" for i in range(3, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
    pitch = {"C": 18.0, "T": 26.0, "L": 33.0}
    top = (9 * 26.0 + 3 * 26.0 + 5 * 18.0) * height  # C3's top: T10's top stays at 78 mm whatever is missing
    bottoms, labels, discs = [], [], []
    block_lower = VERTEBRAE[VERTEBRAE.index(plan.fused) + 1] if plan.fused else None
    for name in names:
        if name == plan.missing:
            continue  # the column below moves up: one vertebra shorter
        length = pitch[name[0]] * height
        top -= length
        disc = length * (0.2 if name[0] == "L" else 0.17)
        if name == block_lower:  # the lower vertebra of a block belongs to the upper one, no disc between
            bottoms[-1], discs[-1] = top, disc
            continue
        bottoms.append(top)
        labels.append(_ID.get(f"vertebrae_{name}", 0))
        discs.append(disc)
    return np.array(bottoms), np.array(labels, dtype=np.uint8), np.array(discs)


def generate_thorax_phantom(seed: int, config: ThoraxConfig | None = None, *, case_index: int = 0) -> Phantom:
    """Draw one thoraco-lumbar CT phantom.

    Args:
        seed: dataset seed; with `case_index` it fixes every random choice (same inputs, same bytes).
        config: shape, spacing, absence rates, noise.
        case_index: index of the case in its dataset (cases are independent of how many are drawn).

    Returns:
        The `Phantom` (image ``[D, H, W]`` int16 HU; labels ``[D, H, W]`` uint8, ids of `STRUCTURES` from 1).
    """
    config = config or ThoraxConfig()
    seed, case_index = int(seed), int(case_index)
    shape, spacing = tuple(int(n) for n in config.shape), config.spacing_mm
    # Scenarios draw from a stream of their own: a case with and without one has the same anatomy.
    scenarios, plan = _plan(np.random.default_rng([seed, case_index, 3]), config.absence_rates, shape[0] * spacing[0])
    rng = np.random.default_rng([seed, case_index])
    z_offset = _FOV_CENTRE_MM + float(rng.uniform(-12.0, 12.0)) + plan.fov_shift_mm
    canvas = Canvas(shape, spacing, z_offset, rng)  # type: ignore[arg-type]
    size, height, fat_mm = float(rng.uniform(0.9, 1.06)), float(rng.uniform(0.95, 1.05)), float(rng.uniform(6, 25))
    fine, blobs = smooth_noise(rng, shape, 1.0), smooth_noise(rng, shape, 2.0)  # texture, bowel loops
    cavity, wall, diaphragm = _draw_body(canvas, size, height, fat_mm, fine, plan)
    forbidden, spine_y = _draw_spine(canvas, size, height, fine, cavity, wall, plan)
    _draw_abdomen(canvas, size, height, fine, blobs, cavity & (canvas.z < diaphragm) & ~forbidden, plan)
    _draw_chest(canvas, rng, size, height, fine, cavity, diaphragm, forbidden, spine_y, plan)

    image = ndimage.gaussian_filter(canvas.hu, 0.6)  # partial volume, then correlated noise
    image += np.float32(config.noise_hu) * smooth_noise(rng, shape, 0.5)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    labels = canvas.labels
    fov = next((SCENARIOS[s] for s in ("thorax_only", "abdomen_only") if s in scenarios), "outside the field of view")
    absent, cut = _bookkeeping(labels, plan.removed, fov, config.min_voxels)
    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [(shape[2] - 1) / 2 * sx, (shape[1] - 1) / 2 * sy, -(shape[0] - 1) / 2 * sz + z_offset]
    info: dict[str, Any] = {"size_factor": round(size, 4), "subcutaneous_fat_mm": round(fat_mm, 2),
                            "fov_shift_mm": round(z_offset, 2)}  # fmt: skip
    if plan.shift_mm:
        info["mediastinal_shift_mm"] = round(plan.shift_mm, 2)
    return Phantom(image, labels, affine, scenarios, absent, cut, info, small=plan.small)


def _bookkeeping(labels: np.ndarray, removed: dict[str, str], fov: str, min_voxels: int) -> tuple[dict, dict]:
    """{name: reason} of absent and of cut structures; slivers under `min_voxels` are erased from `labels`."""
    counts = np.bincount(labels.ravel(), minlength=len(STRUCTURES) + 1)
    top = np.bincount(labels[-1].ravel(), minlength=counts.size)
    bottom = np.bincount(labels[0].ravel(), minlength=counts.size)
    absent, cut = {}, {}
    for name, label in _ID.items():
        if name in removed:
            absent[name] = removed[name]
        elif counts[label] < min_voxels:
            absent[name] = fov
            if counts[label]:
                labels[labels == label] = 0
        elif top[label] or bottom[label]:
            cut[name] = "cut by the field of view at the " + ("top" if top[label] else "bottom")
    return absent, cut


def _draw_body(canvas: Canvas, size: float, height: float, fat_mm: float, fine: np.ndarray, plan: _Plan):
    """Skin, fat and muscle wall; returns the body cavity, the muscle wall and the diaphragm's height (mm)."""
    z, y, x = canvas.z, canvas.y, canvas.x
    s, h = size, height
    width = 138.0 * s * (1.0 + 0.05 * np.clip(-(z + 120.0) / 150.0, 0.0, 1.0))  # wider at the pelvis
    cy = 8.0 * s

    def inside(grow_x: float, grow_front: float, grow_back: float) -> np.ndarray:
        depth = np.where(y < cy, 98.0 * s + grow_front, 92.0 * s + grow_back)
        return np.abs(x / (width + grow_x)) ** _P + np.abs((y - cy) / depth) ** _P <= 1.0

    canvas.hu[inside(0.9 * fat_mm, fat_mm, 0.45 * fat_mm)] = 30.0
    fat = inside(0.9 * fat_mm - 3.0, fat_mm - 3.0, 0.45 * fat_mm - 3.0)
    canvas.hu[fat] = -105.0 + 8.0 * fine[fat]
    wall = inside(0.0, 0.0, 0.0)
    canvas.hu[wall] = 48.0 + 5.0 * fine[wall]
    cavity = inside(-14.0 * s, -12.0 * s, -14.0 * s)
    # Two domes, low at the back; a side that lost lung volume has its hemidiaphragm raised.
    back = 0.6 * np.maximum(y, 0.0) ** 2
    diaphragm = np.maximum(80.0 * h + plan.raised_mm[-1] - ((x + 55.0 * s) ** 2 + y**2 + back) / 230.0,
                           70.0 * h + plan.raised_mm[1] - ((x - 60.0 * s) ** 2 + (y - 10.0) ** 2 + back) / 230.0)  # fmt: skip
    canvas.hu[cavity & (z >= diaphragm) & (z < diaphragm + 5.0)] = 45.0
    return cavity, wall, diaphragm


def _draw_spine(canvas: Canvas, size: float, height: float, fine, cavity, wall, plan: _Plan):
    """Vertebrae (labelled T10-L5), discs, sacrum, ribs, sternum and back muscles; returns (forbidden, spine y)."""
    z, y, x = canvas.z, canvas.y, canvas.x
    s, h = size, height
    bottoms, ids, discs = _column(height, plan)
    lordosis, kyphosis = np.exp(-(((z + 85.0 * h) / 75.0) ** 2)), np.exp(-(((z - 150.0 * h) / 90.0) ** 2))
    spine_y = s * (48.0 - 10.0 * lordosis + 6.0 * kyphosis)  # the lumbar spine bows forward, the thoracic back
    lumbar = np.clip((70.0 * h - z) / (240.0 * h), 0.0, 1.0)
    semi_x, semi_y = (18.0 + 6.0 * lumbar) * s, (14.0 + 3.0 * lumbar) * s
    segment = np.searchsorted(-bottoms, -z)  # index of the segment holding each voxel: bottoms are descending
    in_column = segment < len(bottoms)
    index = np.minimum(segment, len(bottoms) - 1)
    length = np.where(index > 0, bottoms[np.maximum(index - 1, 0)] - bottoms[index], 18.0 * h)
    phase = np.clip((z - bottoms[index]) / length, 0.0, 1.0)  # 0 at the segment's bottom, 1 at its top
    body = (x / semi_x) ** 2 + ((y - spine_y) / semi_y) ** 2
    disc = phase * length < discs[index]
    canal_y = spine_y + semi_y + 12.0 * s
    canal_r = np.sqrt(x**2 + (y - canal_y) ** 2)
    arch = (canal_r > 9.0 * s) & (canal_r < 16.0 * s) & (y > spine_y + semi_y - 2.0) & (phase > 0.25)
    spinous = (np.abs(x) < 5.0) & (y > canal_y + 12.0 * s) & (y < canal_y + 36.0 * s) & (phase > 0.35) & (phase < 0.85)
    transverse = ((np.abs(np.abs(x) - 30.0 * s) < 11.0 * s) & (np.abs(y - canal_y + 2.0 * s) < 4.5)
                  & (phase > 0.4) & (phase < 0.75))  # fmt: skip
    muscles = np.zeros(canvas.shape, dtype=bool)
    for side in (-1.0, 1.0):
        back = ((x - side * 33.0 * s) / (26.0 * s)) ** 2 + ((y - canal_y - 14.0 * s) / (18.0 * s)) ** 2 <= 1.0
        muscles |= back & wall
        depth = np.clip((-10.0 * h - z) / 140.0, 0.0, 1.0)  # psoas grows from L1 downwards
        psoas = (x - side * (30.0 + 22.0 * depth) * s) ** 2 + (y - spine_y + 6.0 * s) ** 2 <= (26.0 * s * depth) ** 2
        muscles |= psoas & cavity
    canvas.hu[muscles] = 50.0 + 5.0 * fine[muscles]
    bone = in_column & (((body <= 1.0) & ~disc) | arch | spinous | transverse)
    canvas.hu[in_column & (body <= 1.0)] = 85.0  # discs; bone on top
    canvas.hu[bone] = np.where(body[bone] > 0.62, 650.0, 220.0 + 25.0 * fine[bone])
    canvas.hu[in_column & (canal_r <= 9.0 * s)] = 15.0
    canvas.labels[bone] = ids[index[bone]]
    # Sacrum: below the last vertebra, tilting backwards and widening into the alae.
    depth_below = bottoms[-1] - z
    sacrum = (depth_below > 0) & (depth_below < 100.0 * h) & wall
    sacrum &= (x / (45.0 * s)) ** 2 + ((y - spine_y - 0.35 * depth_below) / (16.0 * s)) ** 2 <= 1.0
    canvas.hu[sacrum] = 320.0
    # Ribs: bands of the chest wall descending from each thoracic vertebra round to the front.
    thoracic_bottom = bottoms[np.nonzero(ids <= _ID["vertebrae_T12"])[0][-1]]  # unlabelled C3-T9 are 0
    cavity_metric = np.abs(x / (124.0 * s)) ** _P + np.abs((y - 8.0 * s) / np.where(y < 8.0 * s, 86.0, 78.0) / s) ** _P
    sin_theta = np.clip((y - 8.0 * s) / np.maximum(np.sqrt(x**2 + (y - 8.0 * s) ** 2), 1.0), -1.0, 1.0)
    rib_level = z + 0.35 * np.arccos(sin_theta) * 115.0 * s  # the height where the rib leaves the spine
    rib = ((cavity_metric > 1.0) & (cavity_metric < 1.3) & wall & (rib_level > thoracic_bottom)
           & (np.mod((rib_level - thoracic_bottom) / (26.0 * h), 1.0) < 0.3)
           & (z > 70.0 * h * ((1.0 - sin_theta) / 2.0) ** 2) & ~((np.abs(x) < 30.0 * s) & (y > 30.0 * s)))  # fmt: skip
    canvas.hu[rib] = np.where(sin_theta[rib] < -0.85, 160.0, 560.0)  # costal cartilage in front
    sternum = (np.abs(x) < 14.0 * s) & (y < -70.0 * s) & wall & (z > 60.0 * h) & (cavity_metric > 1.0)
    canvas.hu[sternum] = 380.0
    forbidden = bone | (in_column & (body <= 1.0)) | (canal_r < 16.0 * s) | muscles | sacrum
    return forbidden, spine_y


def _draw_abdomen(canvas: Canvas, size: float, height: float, fine, blobs, allowed, plan: _Plan) -> None:
    """Unlabelled abdominal and pelvic background: fat, liver, spleen, stomach, kidneys, bowel, bladder, hips."""
    z, y = canvas.z, canvas.y
    s, h = size, height
    canvas.hu[allowed] = -90.0 + 10.0 * fine[allowed]
    bowel = allowed & (z < -30.0 * h) & (y < 25.0 * s) & (np.abs(blobs) < 0.45)
    canvas.hu[bowel] = np.where(fine[bowel] > 1.8, -850.0, 35.0 + 8.0 * fine[bowel])
    right_up, left_up = plan.raised_mm[-1], plan.raised_mm[1]  # organs follow a raised hemidiaphragm
    for centre, semi, hu in (
        ((20.0 * h + right_up, 5.0 * s, -58.0 * s), (80.0 * h, 85.0 * s, 80.0 * s), 60.0),  # liver
        ((25.0 * h + left_up, 48.0 * s, 80.0 * s), (50.0 * h, 45.0 * s, 24.0 * s), 50.0),  # spleen
        ((-40.0 * h, 55.0 * s, -66.0 * s), (50.0 * h, 22.0 * s, 26.0 * s), 150.0),  # right kidney
        ((-25.0 * h, 55.0 * s, 66.0 * s), (50.0 * h, 22.0 * s, 26.0 * s), 150.0),  # left kidney
        ((-300.0 * h, -40.0 * s, 0.0), (40.0, 40.0 * s, 55.0 * s), 10.0),  # bladder
    ):
        box, q = canvas.ellipsoid(centre, semi)
        canvas.paint(box, q <= 1.0, hu + 5.0 * fine[box], allowed=allowed)
    box, q = canvas.ellipsoid((40.0 * h + left_up, -30.0 * s, 50.0 * s), (45.0 * h, 35.0 * s, 40.0 * s))
    contents = np.where(y[box] < -40.0 * s, -950.0, 20.0 + 6.0 * fine[box])  # stomach: gas in front of fluid
    canvas.paint(box, q <= 1.0, np.where(q > 0.8, 60.0, contents), allowed=allowed)
    for side in (-1.0, 1.0):
        box, q = canvas.ellipsoid((-215.0 * h, 40.0 * s, side * 85.0 * s), (55.0, 50.0 * s, 40.0 * s))
        wing = (q <= 1.0) & (q >= 0.7) & (y[box] > 10.0 * s)  # the posterior half of a shell
        canvas.paint(box, wing, 420.0, allowed=canvas.labels == 0)
        box, q = canvas.ellipsoid((-300.0 * h, 5.0 * s, side * 90.0 * s), (24.0, 24.0, 24.0))
        canvas.paint(box, q <= 1.0, 380.0)  # femoral head


def _tube(canvas: Canvas, points, radii, hu, label: int | None, allowed: np.ndarray) -> None:
    """Paint a tube along `points` (mm) with radii (mm); `hu` a number or a function of (m, box)."""
    box, m, _ = canvas.tube(points, radii)
    canvas.paint(box, m <= 1.0, hu(m, box) if callable(hu) else hu, label, allowed)


def _draw_chest(canvas: Canvas, rng, size, height, fine, cavity, diaphragm, forbidden, spine_y, plan: _Plan) -> None:
    """Lungs, mediastinum, heart, great vessels, airways, oesophagus and the scenarios' surgical changes."""
    z, y, x = canvas.z, canvas.y, canvas.x
    s, h, shift = size, height, plan.shift_mm
    free = cavity & ~forbidden
    thorax = free & (z >= diaphragm + 5.0)
    apex = 330.0 * h - ((np.abs(x - shift) - 60.0 * s) ** 2 + y**2) / 180.0
    mid_x = shift + 4.0 * s
    mediastinum = thorax & (np.abs(x - mid_x) < 26.0 * s) & (y < spine_y - 8.0 * s)
    heart_scale = float(np.clip(rng.normal(1.0, 0.08), 0.85, 1.15))
    canvas.hu[thorax] = 35.0  # neck and shoulders above the apices
    for name, side in (("left_lung", 1), ("right_lung", -1)):
        hemithorax = thorax & ~mediastinum & (z < apex) & ((x > mid_x) if side > 0 else (x <= mid_x))
        if name in plan.removed:  # the pneumonectomy space fills with fluid, sometimes with air in front
            values = np.where(y < plan.fluid_level_mm * s, -980.0, 20.0 + 6.0 * fine)
        else:  # lung with vessels
            values = np.where(fine > 2.0, -250.0, -860.0 + 25.0 * fine)
            canvas.labels[hemithorax] = _ID[name]
        canvas.hu[hemithorax] = values[hemithorax]
    canvas.hu[mediastinum] = -80.0 + 10.0 * fine[mediastinum]
    open_ = free & (z >= diaphragm)  # mediastinal structures may push into the lungs, not into bone
    # Unlabelled vessels first (label 0 over the lungs); labelled structures then paint over them.
    _tube(canvas, [(420.0 * h, -22.0 * s, -24.0 * s + shift), (150.0 * h, -22.0 * s, -22.0 * s + shift)],
          [9.0, 10.0], 150.0, 0, open_)  # superior vena cava  # fmt: skip
    trunk = [(140.0 * h, -40.0 * s, 12.0 * s + shift), (185.0 * h, -20.0 * s, 14.0 * s + shift)]
    for side in (1, -1):  # pulmonary arteries to each hilum; ligated after pneumonectomy
        if side != plan.empty_side:
            hilum = (175.0 * h, 0.0, side * 48.0 * s + shift)
            _tube(canvas, [*trunk, hilum], [13.0, 12.0, 9.0], 170.0, 0, open_)
    _tube(canvas, [(65.0 * h, -5.0 * s, -28.0 * s + shift), (-140.0 * h, 30.0 * s, -20.0 * s)], [12.0, 10.0], 150.0,
          0, free)  # inferior vena cava  # fmt: skip
    box, q = canvas.ellipsoid((110.0 * h, -30.0 * s, 18.0 * s + shift),
                              np.array([52.0 * h, 44.0 * s, 58.0 * s]) * heart_scale,
                              rotation("z", -25.0) @ rotation("y", 20.0))  # fmt: skip
    heart = np.where(q > 0.72, 70.0, 150.0).astype(np.float32) + 5.0 * fine[box]
    canvas.paint(box, q <= 1.0, heart, _ID["heart"], thorax)
    aorta = [(140.0 * h, -30.0 * s, 5.0 * s + shift), (205.0 * h, -28.0 * s, shift), (245.0 * h, -5.0 * s, 5.0 * s + shift),
             (235.0 * h, 20.0 * s, 24.0 * s + 0.5 * shift), (170.0 * h, 30.0 * s, 28.0 * s + 0.3 * shift),
             (60.0 * h, 30.0 * s, 22.0 * s), (0.0, 26.0 * s, 10.0 * s), (-125.0 * h, 20.0 * s, 4.0 * s)]  # fmt: skip
    for branch_x in (-14.0, 5.0, 27.0):  # arch branches, unlabelled
        _tube(canvas, [aorta[2], (420.0 * h, -5.0 * s, branch_x * s + shift)], [5.0, 5.0], 170.0, 0, open_)
    _tube(canvas, aorta, [14.0, 14.0, 13.0, 12.0, 11.0, 11.0, 10.0, 9.0], lambda m, box: 180.0 + 5.0 * fine[box],
          _ID["aorta"], free)  # fmt: skip
    esophagus = [(420.0 * h, 18.0 * s, 4.0 * s + 0.3 * shift), (150.0 * h, 20.0 * s, 8.0 * s + 0.5 * shift),
                 (60.0 * h, 14.0 * s, 20.0 * s), (30.0 * h, -5.0 * s, 40.0 * s)]  # fmt: skip
    _tube(canvas, esophagus, [8.0] * 4, lambda m, box: np.where(m < 0.3, -700.0, 40.0), _ID["esophagus"], free)
    _draw_airways(canvas, s, h, plan, open_)


def _draw_airways(canvas: Canvas, s: float, h: float, plan: _Plan, allowed: np.ndarray) -> None:
    """Trachea and main bronchi (one label), bronchial stumps and staple lines of the surgical scenarios."""
    shift = plan.shift_mm
    carina = np.array([195.0 * h, 8.0 * s, 0.6 * shift])

    def airway(m: np.ndarray, box) -> np.ndarray:
        return np.where(m < 0.75, -1000.0, 40.0)  # air lumen, soft-tissue wall

    _tube(canvas, [(480.0 * h, -10.0 * s, 0.0), (300.0 * h, 0.0, 0.3 * shift), carina], [9.0, 9.0, 9.0], airway,
          _ID["trachea"], allowed)  # fmt: skip
    staple_r = 0.6 * max(canvas.spacing)  # at least one voxel wide at any spacing
    for side in (1, -1):
        hilum = np.array([(160.0 if side > 0 else 168.0) * h, 16.0 * s, side * 55.0 * s + shift])
        if side == plan.empty_side:  # a 15 mm stump closed by a staple line across its end
            end = carina + 15.0 * (hilum - carina) / np.linalg.norm(hilum - carina)
            _tube(canvas, [carina, end], [7.0, 6.5], airway, _ID["trachea"], allowed)
            across = np.array([0.0, 0.0, 8.0])
            _tube(canvas, [end - across, end + across], [staple_r] * 2, _STAPLE_HU, 0, allowed)
            continue
        _tube(canvas, [carina, hilum], [7.0, 6.0], airway, _ID["trachea"], allowed)
        if side == plan.lobectomy_side:  # lower-lobe bronchus stump and the parenchymal staple line
            stump = hilum + np.array([-12.0, 10.0 * s, side * 6.0 * s])
            across = np.array([0.0, 6.0, 0.0])
            _tube(canvas, [stump - across, stump + across], [staple_r] * 2, _STAPLE_HU, 0, allowed)
            line = [(140.0 * h, -10.0 * s, side * 70.0 * s + shift), (170.0 * h, 30.0 * s, side * 85.0 * s + shift)]
            _tube(canvas, line, [staple_r] * 2, _STAPLE_HU, 0, allowed)
