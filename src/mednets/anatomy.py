"""The organ registry: one source of truth for the 13 abdominal organs of BTCV.

Every part of mednets that names an organ (the phantom generator, label mapping, metrics, sidecars,
reports) reads it from here, so an id means the same organ everywhere. Ids follow BTCV
(Beyond the Cranial Vault, MICCAI 2015): spleen 1 ... left adrenal gland 13; 0 is background.

Absent organs follow one written convention (DESIGN.md, STYLE.md section 6): Dice is averaged over
present organs only, absent organs are scored by false-positive volume, and a mean never holds NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

from mednets.errors import UnknownNameError

__all__ = [
    "BACKGROUND",
    "MIN_VOXELS",
    "ORGANS",
    "Organ",
    "left_right_pairs",
    "label_names",
    "organ",
    "organ_by_id",
    "organ_id",
    "organ_names",
]

BACKGROUND = 0
# A structure counts as present when its mask has at least this many voxels (datasets, phantoms and
# evaluation alike): a few stray voxels at a field-of-view edge are not an organ.
MIN_VOXELS = 10


@dataclass(frozen=True)
class Organ:
    """One organ of the registry.

    Attributes:
        id: label value in every mednets label map (BTCV numbering).
        name: snake_case name, the key used in `dataset.json` `labels` and in sidecars.
        display: human-readable name for legends and reports.
        typical_volume_ml: typical adult volume in millilitres (order of magnitude for checks and
            for size-aware losses, not a diagnostic reference).
        side: "left", "right" or None (patient's left/right).
        pair: name of the contralateral organ, or None.
        color: RGB in [0, 1] for overlays and legends.
    """

    id: int
    name: str
    display: str
    typical_volume_ml: float
    side: str | None = None
    pair: str | None = None
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)


# Volumes: adult averages from CT volumetry literature, rounded (liver ~1500 mL, spleen ~200 mL,
# kidney ~150 mL, pancreas ~70 mL, adrenal ~5 mL, vessels counted over an abdominal field of view).
ORGANS: tuple[Organ, ...] = (
    Organ(1, "spleen", "Spleen", 200.0, "left", None, (0.80, 0.30, 0.80)),
    Organ(2, "right_kidney", "Right kidney", 150.0, "right", "left_kidney", (0.95, 0.75, 0.20)),
    Organ(3, "left_kidney", "Left kidney", 150.0, "left", "right_kidney", (0.95, 0.55, 0.10)),
    Organ(4, "gallbladder", "Gallbladder", 40.0, "right", None, (0.20, 0.80, 0.30)),
    Organ(5, "esophagus", "Esophagus", 20.0, None, None, (0.60, 0.40, 0.20)),
    Organ(6, "liver", "Liver", 1500.0, "right", None, (0.85, 0.20, 0.20)),
    Organ(7, "stomach", "Stomach", 400.0, "left", None, (0.30, 0.60, 0.95)),
    Organ(8, "aorta", "Aorta", 60.0, None, None, (1.00, 0.10, 0.50)),
    Organ(9, "inferior_vena_cava", "Inferior vena cava", 50.0, None, None, (0.20, 0.30, 0.90)),
    Organ(10, "portal_splenic_vein", "Portal and splenic vein", 20.0, None, None, (0.10, 0.80, 0.80)),
    Organ(11, "pancreas", "Pancreas", 70.0, None, None, (0.95, 0.85, 0.50)),
    Organ(12, "right_adrenal", "Right adrenal gland", 5.0, "right", "left_adrenal", (0.55, 0.85, 0.10)),
    Organ(13, "left_adrenal", "Left adrenal gland", 5.0, "left", "right_adrenal", (0.35, 0.65, 0.05)),
)

_BY_NAME = {o.name: o for o in ORGANS}
_BY_ID = {o.id: o for o in ORGANS}


def organ_names() -> list[str]:
    """Names of the 13 organs in id order."""
    return [o.name for o in ORGANS]


def label_names() -> dict[str, int]:
    """The `labels` mapping of `dataset.json`: {"background": 0, "spleen": 1, ...}."""
    return {"background": BACKGROUND, **{o.name: o.id for o in ORGANS}}


def organ(name: str) -> Organ:
    """Look an organ up by name (case-insensitive; spaces and hyphens read as underscores).

    Raises:
        UnknownNameError: the name is not in the registry; the message lists the valid names.
    """
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in _BY_NAME:
        raise UnknownNameError("unknown organ", source="organ name", expected=", ".join(_BY_NAME), got=name)
    return _BY_NAME[key]


def organ_id(name: str) -> int:
    """Label id of the organ called `name` (see `organ`)."""
    return organ(name).id


def organ_by_id(label: int) -> Organ:
    """The organ with label value `label`.

    Raises:
        UnknownNameError: no organ has that id (0 is background, not an organ).
    """
    if int(label) not in _BY_ID:
        raise UnknownNameError("unknown organ id", source="organ id", expected="1..13", got=label)
    return _BY_ID[int(label)]


def left_right_pairs() -> list[tuple[int, int]]:
    """(right id, left id) for every organ with a contralateral twin: kidneys and adrenals.

    A left-right flip of the image must swap these labels, so augmentations that flip the
    patient's left-right axis are disabled when they are distinct classes.
    """
    pairs = []
    for o in ORGANS:
        if o.side == "right" and o.pair is not None:
            pairs.append((o.id, _BY_NAME[o.pair].id))
    return pairs
