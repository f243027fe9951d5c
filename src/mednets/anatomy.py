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
    "GENERIC_SNOMED",
    "MIN_VOXELS",
    "ORGANS",
    "Organ",
    "SNOMED_LATERALITY",
    "Segment",
    "describe_structures",
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
        snomed: SNOMED CT (code, meaning) of the structure, as DICOM-SEG and 3D Slicer's terminology
            name it; left and right organs share the code and differ by a laterality modifier (`side`).
    """

    id: int
    name: str
    display: str
    typical_volume_ml: float
    side: str | None = None
    pair: str | None = None
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    snomed: tuple[str, str] = ("91723000", "Anatomical structure")  # GENERIC_SNOMED


# Volumes: adult averages from CT volumetry literature, rounded (liver ~1500 mL, spleen ~200 mL,
# kidney ~150 mL, pancreas ~70 mL, adrenal ~5 mL, vessels counted over an abdominal field of view).
ORGANS: tuple[Organ, ...] = (
    Organ(1, "spleen", "Spleen", 200.0, "left", None, (0.80, 0.30, 0.80), ("78961009", "Spleen")),
    Organ(2, "right_kidney", "Right kidney", 150.0, "right", "left_kidney", (0.95, 0.75, 0.20), ("64033007", "Kidney")),
    Organ(3, "left_kidney", "Left kidney", 150.0, "left", "right_kidney", (0.95, 0.55, 0.10), ("64033007", "Kidney")),
    Organ(4, "gallbladder", "Gallbladder", 40.0, "right", None, (0.20, 0.80, 0.30), ("28231008", "Gallbladder")),
    Organ(5, "esophagus", "Esophagus", 20.0, None, None, (0.60, 0.40, 0.20), ("32849002", "Esophagus")),
    Organ(6, "liver", "Liver", 1500.0, "right", None, (0.85, 0.20, 0.20), ("10200004", "Liver")),
    Organ(7, "stomach", "Stomach", 400.0, "left", None, (0.30, 0.60, 0.95), ("69695003", "Stomach")),
    Organ(8, "aorta", "Aorta", 60.0, None, None, (1.00, 0.10, 0.50), ("15825003", "Aorta")),
    Organ(
        9,
        "inferior_vena_cava",
        "Inferior vena cava",
        50.0,
        None,
        None,
        (0.20, 0.30, 0.90),
        ("64131007", "Inferior vena cava"),
    ),
    Organ(
        10,
        "portal_splenic_vein",
        "Portal and splenic vein",
        20.0,
        None,
        None,
        (0.10, 0.80, 0.80),
        ("32764006", "Portal vein"),
    ),
    Organ(11, "pancreas", "Pancreas", 70.0, None, None, (0.95, 0.85, 0.50), ("15776009", "Pancreas")),
    Organ(
        12,
        "right_adrenal",
        "Right adrenal gland",
        5.0,
        "right",
        "left_adrenal",
        (0.55, 0.85, 0.10),
        ("23451007", "Adrenal gland"),
    ),
    Organ(
        13,
        "left_adrenal",
        "Left adrenal gland",
        5.0,
        "left",
        "right_adrenal",
        (0.35, 0.65, 0.05),
        ("23451007", "Adrenal gland"),
    ),
)

# The SNOMED CT code of a structure that is not in the registry (a dataset's own label).
GENERIC_SNOMED = ("91723000", "Anatomical structure")
# SNOMED CT laterality qualifiers (DICOM CID 244), the modifier of a paired organ's code.
SNOMED_LATERALITY = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}
# Colours of structures outside the registry: matplotlib's tab20, written out so that `anatomy` needs no plotting.
_OTHER_COLOURS = (
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)  # fmt: skip

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


@dataclass(frozen=True)
class Segment:
    """What viewers and DICOM need to show one structure of a label map: name, colour and code.

    Attributes:
        label: its value in the label map.
        name: the run's structure name (`dataset.json` `labels` key), e.g. ``right_kidney``.
        display: human-readable name, e.g. ``Right kidney``.
        color: RGB in [0, 1].
        snomed: SNOMED CT (code, meaning) of the structure type.
        laterality: SNOMED CT (code, meaning) of its side for paired organs, else None.
    """

    label: int
    name: str
    display: str
    color: tuple[float, float, float]
    snomed: tuple[str, str]
    laterality: tuple[str, str] | None = None


def describe_structures(structures: dict[str, int]) -> list[Segment]:
    """Names, colours and codes of a run's structures ({name: label id}, background excluded), by label.

    Registry organs (matched by name) get their registry entry; other structures (a dataset's own
    labels) their name, a tab20 colour by label and the generic code "Anatomical structure".
    """
    segments = []
    for name, label in sorted(structures.items(), key=lambda item: item[1]):
        known = _BY_NAME.get(name)
        if known is None:
            display = name.replace("_", " ").capitalize()
            colour = _OTHER_COLOURS[(label - 1) % len(_OTHER_COLOURS)]
            segments.append(Segment(label, name, display, colour, GENERIC_SNOMED))
        else:
            laterality = SNOMED_LATERALITY[known.side] if known.pair and known.side else None
            segments.append(Segment(label, name, known.display, known.color, known.snomed, laterality))
    return segments
