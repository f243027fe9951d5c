"""DICOM-SEG (highdicom): a label map of a DICOM series written as a Segmentation that a PACS files with its study.

The Segmentation references its source series: same patient and Study Instance UID, the source's
Frame of Reference UID, one frame per source slice that holds the structure, and each segment labelled
with its SNOMED CT code (`mednets.anatomy.describe_structures`). Structures with no voxel (judged
absent) are left out: DICOM-SEG has no empty segment, and the caller records why in the sidecar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mednets.anatomy import Segment
from mednets.atomic import atomic_path
from mednets.data.dicom import read_headers, software_version
from mednets.data.volume import RAS_TO_LPS, Volume
from mednets.errors import InvalidInputError

__all__ = ["read_dicom_seg", "source_slices", "write_dicom_seg"]

# Slices whose positions differ from the label map's by more than this (mm) are not its source.
_POSITION_TOLERANCE_MM = 0.01


def source_slices(labels: Volume, files: list[str]) -> list[Any]:
    """The source slices' headers in the label map's slice order (`labels.array[k]` lies on the k-th).

    Each slice is matched by its ImagePositionPatient to the world position of the label map's
    slice, so the order never depends on how a reader sorted the files.

    Raises:
        InvalidInputError: a slice cannot be read, or the files and the label map's slices disagree.
    """
    headers = read_headers(files)
    positions = np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers])
    lps = RAS_TO_LPS @ labels.affine
    wanted = np.stack([(lps @ [0.0, 0.0, k, 1.0])[:3] for k in range(labels.array.shape[0])])
    distance = np.linalg.norm(wanted[:, None, :] - positions[None, :, :], axis=-1)  # [D, files]
    nearest = distance.argmin(axis=1)
    if len(files) != len(wanted) or distance[np.arange(len(wanted)), nearest].max() > _POSITION_TOLERANCE_MM:
        raise InvalidInputError("the label map does not lie on the source series' slices", source=str(files[0]),
                                expected=f"{len(wanted)} slices at the label map's positions",
                                got=f"{len(files)} files")  # fmt: skip
    return [headers[index] for index in nearest]


def _description(segment: Segment, number: int, algorithm: Any) -> Any:
    """One SegmentDescription: label, SNOMED CT category and type (with laterality), display colour."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.display,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(segment.snomed[0], "SCT", segment.snomed[1]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in segment.color)),
    )
    if segment.laterality is not None:  # "Kidney" + "Right": the DICOM way to name a paired organ
        description.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(segment.laterality[0], "SCT", segment.laterality[1])
        ]
    return description


def write_dicom_seg(
    labels: Volume,
    segments: list[Segment],
    source_files: list[str],
    path: str | os.PathLike[str],
    *,
    model_name: str,
) -> list[Segment]:
    """Write `labels` (`[D, H, W]` label ids on the source series' grid) as a DICOM-SEG file at `path`.

    Args:
        labels: the label map with the source series' geometry.
        segments: the structures to write (`describe_structures`); those with no voxel are left out.
        source_files: the source series' slice files (any order).
        path: the `.dcm` file to write (atomically).
        model_name: the algorithm's name in the Segmentation.

    Returns:
        The segments written (in segment-number order); empty when no structure has a voxel, and
        then nothing is written.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = source_slices(labels, source_files)
    counts = np.bincount(labels.array.ravel(), minlength=max(s.label for s in segments) + 1)  # one pass
    present = [segment for segment in segments if counts[segment.label] > 0]
    if not present:
        return []
    # Segment numbers run 1..N over the written segments, whatever the label ids; other ids are background.
    lookup = np.zeros(len(counts), dtype=np.uint8)
    for number, segment in enumerate(present, start=1):
        lookup[segment.label] = number
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, family=codes.DCM.ArtificialIntelligence,
                                                   version=software_version())  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=lookup[labels.array],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(s, n, algorithm) for n, s in enumerate(present, start=1)],
        series_instance_uid=hd.UID(),
        series_number=9000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="mednets",
        manufacturer_model_name=model_name,
        software_versions=software_version(),
        device_serial_number="0",
        series_description=f"mednets {model_name} segmentation",
    )
    with atomic_path(Path(path)) as temporary:
        seg.save_as(str(temporary))
    return present


def read_dicom_seg(path: str | os.PathLike[str]) -> tuple[Any, dict[str, int]]:
    """Read a DICOM-SEG back with highdicom: the `highdicom.seg.Segmentation` and {segment label: number}.

    Raises:
        InvalidInputError: the file is not a readable DICOM Segmentation.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as error:
        raise InvalidInputError(f"not a readable DICOM-SEG: {error}", source=str(path)) from error
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    return seg, numbers
