"""A case's output files: the label map in the chosen format, its colour table, masks, statistics and sidecar.

Files of one case (`planned_files`), for `<out>/<case>`:

* label map: `.nii.gz` (`nifti`), `.nrrd` (`nrrd`), `.seg.nrrd` (`seg-nrrd`, 3D Slicer segmentation
  with names, colours and SNOMED CT terminology) or `.seg.dcm` (`dicom-seg`, DICOM inputs only);
  2D images keep `.png` / `.tif`;
* `<case>.ctbl`: label names and colours (3D Slicer colour table), beside every label map;
* `<case>/<structure>.nii.gz` with `split_masks` (`.png` for 2D images);
* `<case>.statistics.json` and `.csv` with `statistics` (`mednets.engine.statistics`);
* `<case>.json`, the sidecar, written last.

A case's files appear together or not at all: a failure removes what the case had written.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mednets.anatomy import Segment, describe_structures
from mednets.atomic import atomic_write_text
from mednets.data.dicom_seg import write_dicom_seg
from mednets.data.io import IMAGE_SUFFIXES, TIFF_SUFFIXES, write_volume
from mednets.data.segmentation_files import write_colour_table, write_seg_nrrd, write_split_masks
from mednets.data.volume import Volume
from mednets.engine.statistics import write_statistics
from mednets.errors import ConfigError, InvalidInputError, UnknownNameError

__all__ = ["OUTPUT_FORMATS", "OutputOptions", "planned_files", "select_structures", "write_case"]

OUTPUT_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "seg-nrrd": ".seg.nrrd", "dicom-seg": ".seg.dcm"}


@dataclass(frozen=True)
class OutputOptions:
    """What `mednets predict` writes per case (see the module docstring)."""

    format: str = "nifti"
    split_masks: bool = False
    statistics: bool = False
    roi_subset: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.format not in OUTPUT_FORMATS:
            raise ConfigError("unknown output format", source="--format", expected=", ".join(OUTPUT_FORMATS),
                              got=self.format)  # fmt: skip


def select_structures(structures: dict[str, int], roi_subset: tuple[str, ...] | None) -> dict[str, int]:
    """The structures to write: all, or those named in `roi_subset` (checked against the run's).

    Raises:
        UnknownNameError: a name the run does not segment (the message lists those it does).
    """
    if not roi_subset:
        return dict(structures)
    unknown = [name for name in roi_subset if name not in structures]
    if unknown:
        raise UnknownNameError("the run does not segment this structure", source="--roi-subset",
                               expected=", ".join(structures), got=", ".join(unknown))  # fmt: skip
    return {name: structures[name] for name in structures if name in roi_subset}


def _is_image_2d(source: Path) -> bool:
    return not source.is_dir() and "".join(source.suffixes[-1:]).lower() in IMAGE_SUFFIXES


def planned_files(source: Path, name: str, out_dir: Path, options: OutputOptions) -> dict[str, Path]:
    """The paths a case will write, by role (`labels`, `colours`, `masks`, `statistics_json`, ..., `sidecar`).

    Raises:
        InvalidInputError: `dicom-seg` or `seg-nrrd` asked for a 2D image, or `dicom-seg` for a non-DICOM input.
    """
    if _is_image_2d(source):
        if options.format not in ("nifti", "nrrd"):
            raise InvalidInputError(f"--format {options.format} is for volumes", source=str(source),
                                    expected="a volume or DICOM series")  # fmt: skip
        ending = ".tif" if source.suffix.lower() in TIFF_SUFFIXES else ".png"
    else:
        ending = OUTPUT_FORMATS[options.format]
        if options.format == "dicom-seg" and not (source.is_dir() or source.suffix.lower() == ".dcm"):
            raise InvalidInputError("--format dicom-seg needs a DICOM series input (it references the source "
                                    "slices)", source=str(source), expected="a DICOM folder")  # fmt: skip
    files = {"labels": out_dir / f"{name}{ending}", "colours": out_dir / f"{name}.ctbl"}
    if options.split_masks:
        files["masks"] = out_dir / name
    if options.statistics:
        files["statistics_json"] = out_dir / f"{name}.statistics.json"
        files["statistics_csv"] = out_dir / f"{name}.statistics.csv"
    files["sidecar"] = out_dir / f"{name}.json"
    return files


def _write_label_map(labels: Volume, segments: list[Segment], path: Path, options: OutputOptions,
                     source_meta: dict[str, Any], model_name: str, sidecar: dict) -> None:  # fmt: skip
    """The label map in its format; DICOM-SEG records in the sidecar which structures it omits and why."""
    if options.format == "seg-nrrd" and labels.array.ndim == 3:
        write_seg_nrrd(labels, segments, path)
    elif options.format == "dicom-seg":
        written = write_dicom_seg(labels, segments, list(source_meta.get("slice_files") or []), path,
                                  model_name=model_name)  # fmt: skip
        kept = {segment.name for segment in written}
        sidecar["dicom_seg"] = {
            "segments": [segment.name for segment in written],
            "omitted": {s.name: "no voxel painted (absent or emptied)" for s in segments if s.name not in kept},
        }
        if not written:
            raise InvalidInputError("no structure was painted: a DICOM-SEG needs at least one segment",
                                    source=str(path), expected="--format nifti for an empty label map")  # fmt: skip
    else:
        write_volume(labels, path)


def write_case(
    labels: Volume,
    structures: dict[str, int],
    files: dict[str, Path],
    options: OutputOptions,
    sidecar: dict[str, Any],
    *,
    statistics: dict[str, dict[str, Any]] | None = None,
    source_meta: dict[str, Any] | None = None,
    model_name: str = "mednets",
) -> list[Path]:
    """Write a case's files (`planned_files`), all or none.

    Args:
        labels: label map with the input's geometry, already restricted to `structures`.
        structures: {name: label id} written (the run's, or the `roi_subset`).
        files: `planned_files(...)`.
        options: the output options.
        sidecar: the sidecar's content (structures, timing, model, input); `files` and the
            write time (`seconds.write`) are added.
        statistics: `structure_statistics(...)` when `options.statistics`.
        source_meta: the input volume's `meta` (DICOM-SEG reads its `slice_files`).
        model_name: the model's registry name (DICOM-SEG's algorithm).

    Returns:
        The files written, label map first, sidecar last.
    """
    segments = describe_structures(structures)
    written: list[Path] = []
    started = time.perf_counter()
    try:
        _write_label_map(labels, segments, files["labels"], options, source_meta or {}, model_name, sidecar)
        written.append(files["labels"])
        written.append(write_colour_table(segments, files["colours"]))
        if "masks" in files:
            suffix = files["labels"].suffix if files["labels"].suffix in (".png", ".tif") else ".nii.gz"
            written.append(write_split_masks(labels, segments, files["masks"], suffix=suffix))
        if statistics is not None:
            written.extend(write_statistics(statistics, files["statistics_json"], files["statistics_csv"]))
        sidecar["files"] = [str(path) for path in [*written, files["sidecar"]]]
        sidecar.setdefault("seconds", {})["write"] = round(time.perf_counter() - started, 3)
        written.append(atomic_write_text(files["sidecar"], json.dumps(sidecar, indent=2, default=_json_default)))
    except BaseException:
        for path in written:  # the case appears together or not at all
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    return written


def _json_default(value: Any) -> Any:
    """numpy scalars in the sidecar as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
