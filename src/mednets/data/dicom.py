"""DICOM CT series: read a folder of slices (SimpleITK/GDCM, pydicom as fallback) and write one atomically.

A series is a folder, so `mednets.data.io` sends folders (and paths without an ending) here. Geometry follows
`mednets.data.volume`: DICOM's LPS positions are converted to and from RAS+ affines.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mednets.data.volume import RAS_TO_LPS, Volume, affine_from_itk, itk_geometry, volume_file_array
from mednets.errors import InvalidInputError

__all__ = ["find_dicom_series", "read_dicom_series", "read_headers", "software_version", "write_dicom_series"]

# DICOM series written by `write_dicom_series`: one file per slice with this name, and this
# SoftwareVersions (0018,1020) prefix. Both must match before an existing folder is replaced, so a
# folder of someone else's files is never deleted.
_DICOM_SLICE_NAME = re.compile(r"slice_\d+\.dcm")
_DICOM_SOFTWARE = "mednets"
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Largest deviation from orthonormal directions (and from a slice axis along the row x column
# normal) accepted: float32 NIfTI affines are orthonormal only to about 1e-7.
_DICOM_GEOMETRY_TOLERANCE = 1e-4


def read_dicom_series(folder: str | os.PathLike[str], *, series_uid: str | None = None) -> Volume:
    """Read one DICOM series (a folder of slices) with SimpleITK/GDCM, falling back to pydicom.

    JPEG 2000 and other compressed transfer syntaxes are decoded by GDCM; if SimpleITK cannot
    decode a series, pydicom with the pylibjpeg plugins reads it instead. Slices are sorted along
    the slice normal and must be evenly spaced. Values are rescaled to HU (RescaleSlope/Intercept).

    Raises:
        InvalidInputError: no series, several series and no `series_uid`, uneven slice spacing,
            or slices that cannot be decoded.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError("DICOM folder not found", source=str(folder))
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception:
        uids = []
    if not uids:
        raise InvalidInputError("no DICOM series found in folder", source=str(folder))
    if series_uid is None:
        if len(uids) > 1:
            raise InvalidInputError(
                "folder holds several DICOM series; choose one with series_uid", source=str(folder), got=uids
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InvalidInputError("series not found in folder", source=str(folder), expected=uids, got=series_uid)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    _check_slice_spacing(files, folder)
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        image = reader.Execute()
        array = sitk.GetArrayFromImage(image)
        affine = affine_from_itk(image)
        reader_name = "simpleitk"
    except Exception:
        # Fallback when GDCM lacks the decoder for this transfer syntax.
        array, affine = _read_dicom_pydicom(files, folder)
        reader_name = "pydicom"
    meta = {
        "source": str(folder),
        "format": "dicom",
        "series_uid": series_uid,
        "files": len(files),
        "slice_files": files,  # the source slices: DICOM-SEG and derived series reference them
        "reader": reader_name,
    }
    return Volume(array, affine, None, meta)


def find_dicom_series(root: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """Every DICOM series in `root` and its subfolders, as (folder, SeriesInstanceUID), sorted by folder then UID.

    Hidden folders are skipped; a folder whose files are not DICOM contributes nothing.
    """
    import SimpleITK as sitk

    found = []
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" for every folder of other files
    try:
        for folder, subfolders, _files in os.walk(root):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            try:
                uids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))
            except Exception:  # an unreadable folder holds no series we can read
                uids = []
            found.extend((Path(folder), uid) for uid in uids)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return sorted(found, key=lambda item: (str(item[0]), item[1]))


def read_headers(files: list[str]) -> list[Any]:
    """The DICOM headers of `files` (pixels not read).

    Raises:
        InvalidInputError: a file is not readable DICOM, naming it.
    """
    import pydicom

    headers = []
    for name in files:
        try:
            headers.append(pydicom.dcmread(name, stop_before_pixels=True))
        except Exception as error:
            raise InvalidInputError(f"cannot read DICOM header: {error}", source=name) from error
    return headers


def _slice_geometry(files: list[str], folder: Path) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]:
    """Headers, orientation rows/cols, pixel spacing and positions of the slices (LPS)."""
    headers = read_headers(files)
    try:
        orientation = np.asarray([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
        positions = np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers])
        pixel_spacing = np.asarray([float(v) for v in headers[0].PixelSpacing])  # (row spacing, column spacing)
    except AttributeError as error:
        raise InvalidInputError(f"DICOM slice lacks geometry: {error}", source=str(folder)) from error
    return headers, orientation, pixel_spacing, positions


def _check_slice_spacing(files: list[str], folder: Path) -> None:
    if len(files) < 2:
        return
    _, orientation, _, positions = _slice_geometry(files, folder)
    normal = np.cross(orientation[0], orientation[1])
    along = np.sort(positions @ normal)
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        raise InvalidInputError("DICOM series has duplicate slice positions", source=str(folder))
    if steps.max() - steps.min() > 0.01 * max(float(np.median(steps)), 1e-6) + 1e-3:
        raise InvalidInputError(
            "DICOM slices are not evenly spaced (missing slice?)",
            source=str(folder),
            expected="constant spacing",
            got=f"steps from {steps.min():.3f} to {steps.max():.3f} mm",
        )


def _read_dicom_pydicom(files: list[str], folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    _, orientation, pixel_spacing, positions = _slice_geometry(files, folder)
    normal = np.cross(orientation[0], orientation[1])
    order = np.argsort(positions @ normal)
    slices = []
    for index in order:
        try:
            dataset = pydicom.dcmread(files[index])
            pixels = dataset.pixel_array.astype(np.float64)
        except Exception as error:
            raise InvalidInputError(f"cannot decode DICOM pixels: {error}", source=files[index]) from error
        slope = float(getattr(dataset, "RescaleSlope", 1.0))
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
    array = np.stack(slices)
    if np.all(array == np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    sorted_positions = positions[order]
    lps = np.eye(4)
    lps[:3, 0] = orientation[0] * pixel_spacing[1]  # along a row (x index): column spacing
    lps[:3, 1] = orientation[1] * pixel_spacing[0]
    lps[:3, 2] = (sorted_positions[-1] - sorted_positions[0]) / max(len(files) - 1, 1) if len(files) > 1 else normal
    lps[:3, 3] = sorted_positions[0]
    return array, RAS_TO_LPS @ lps


def write_dicom_series(volume: Volume, folder: str | os.PathLike[str], *, derived_from: Volume | None = None) -> Path:
    """Write a 3D volume as a DICOM CT series folder: one file per slice, ``slice_00000.dcm`` upwards.

    SimpleITK (GDCM) writes each slice with ``KeepOriginalImageUIDOn`` and the tags a reader needs:
    one StudyInstanceUID, SeriesInstanceUID and FrameOfReferenceUID for the series; per slice a
    SOPInstanceUID, InstanceNumber, ImagePositionPatient and SliceLocation; ImageOrientationPatient,
    PixelSpacing, SliceThickness, SpacingBetweenSlices, Modality CT, RescaleIntercept and
    RescaleSlope. `read_volume` on the folder gives the volume back.

    Pixels are stored as int16, by this rule:

    * integer values (of any dtype, floats included) within int16: stored as they are with slope 1
      and intercept 0, so they (HU in particular) read back exactly, as int16;
    * other integer values spanning at most 65535: slope 1 and an integer intercept; exact too;
    * anything else (fractions, wider ranges): linear quantisation over the 65536 int16 levels with
      slope ``(max - min) / 65535``; values read back (float64) within ``slope / 2`` of the input.

    Geometry: the affine is converted to LPS and written as DICOM decimal strings (at most 16
    characters), so positions come back within about 1e-12 mm and directions within about 1e-14,
    far inside 1e-6. DICOM readers order slices along the row x column normal, so a left-handed
    affine (negative determinant, e.g. ``LAS``) is written with its slice axis reversed: reading it
    back gives the same image with `array` flipped along D and the matching right-handed affine.
    A one-slice volume keeps its voxels, origin and in-plane axes, but SimpleITK reads the slice
    spacing of a single file as 1 mm, so the third affine column does not round-trip.

    Atomic: the slices go to a temporary sibling folder that is renamed to `folder` once complete.
    An existing `folder` is replaced only if it is empty or holds a series this function wrote
    (every entry a ``slice_N.dcm`` file whose SoftwareVersions starts with ``mednets``); it is moved
    aside, the new folder renamed in, and only then deleted, so an error leaves it in place.

    A series derived from a DICOM series (`derived_from`, read by `read_dicom_series`) joins that
    study: it keeps the patient, the Study Instance UID and the Frame of Reference UID, so a PACS
    files it beside its source; otherwise it is a new study.

    Args:
        volume: a 3D single-channel volume, `array` ``[D, H, W]`` with finite values.
        folder: the series folder to create or replace.
        derived_from: the DICOM volume this one was computed from (a prediction, a resampled copy).

    Returns:
        The folder.

    Raises:
        InvalidInputError: the array is not 3D single-channel, not real or not finite; the affine is
            singular or sheared (axes not orthogonal); or `folder` is a file or a folder of other files.
    """
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder = Path(folder)
    _check_dicom_target(folder)  # before any work: a refused target must cost nothing and leave nothing
    array = volume_file_array(volume, folder)
    stored, slope, intercept = _dicom_pixels(array, folder)
    spacing, origin, axes, reverse = _dicom_geometry(volume.affine, stored.shape[0], folder)
    if reverse:
        stored = stored[::-1]
    normal = axes[:, 2]
    now = datetime.datetime.now()
    shared = {
        "0008|0016": _CT_IMAGE_STORAGE,  # SOPClassUID: GDCM keeps patient geometry for CT images
        "0008|0008": "DERIVED\\SECONDARY",  # ImageType
        "0008|0060": "CT",  # Modality
        "0008|0020": now.strftime("%Y%m%d"),  # StudyDate
        "0008|0030": now.strftime("%H%M%S"),  # StudyTime
        "0008|0021": now.strftime("%Y%m%d"),  # SeriesDate
        "0008|0031": now.strftime("%H%M%S"),  # SeriesTime
        "0008|103e": "written by mednets",  # SeriesDescription
        "0018|1020": f"{_DICOM_SOFTWARE} {software_version()}",  # SoftwareVersions: marks folders we may replace
        "0020|000d": generate_uid(),  # StudyInstanceUID
        "0020|000e": generate_uid(),  # SeriesInstanceUID
        "0020|0052": generate_uid(),  # FrameOfReferenceUID
        "0020|0011": "1",  # SeriesNumber
        "0020|0037": _ds(*axes[:, 0], *axes[:, 1]),  # ImageOrientationPatient: row (x) then column (y) direction
        "0028|0030": _ds(spacing[1], spacing[0]),  # PixelSpacing: between rows (y), then between columns (x)
        "0018|0050": _ds(spacing[2]),  # SliceThickness
        "0018|0088": _ds(spacing[2]),  # SpacingBetweenSlices
        "0028|1052": _ds(intercept),  # RescaleIntercept
        "0028|1053": _ds(slope),  # RescaleSlope
        # Stored pixels: signed 16 bit. GDCM needs these to convert a float buffer (see below).
        "0028|0100": "16",
        "0028|0101": "16",
        "0028|0102": "15",
        "0028|0103": "1",
    }
    shared.update(_study_of(derived_from))
    identity = slope == 1.0 and intercept == 0.0
    width = max(5, len(str(stored.shape[0] - 1)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # use our UIDs: otherwise each file would get a new series
    folder.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which creates 0700) so the folder gets the usual permissions.
    staging = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.tmp"
    os.mkdir(staging)
    try:
        for k, plane in enumerate(stored):
            position = origin + k * spacing[2] * normal
            # GDCM treats the buffer as real-world values and applies the inverse rescale itself, so
            # give it the values the stored integers stand for (exact: they are stored * slope + b).
            pixels = plane if identity else plane.astype(np.float64) * slope + intercept
            image = sitk.GetImageFromArray(np.ascontiguousarray(pixels))
            image.SetSpacing((float(spacing[0]), float(spacing[1])))
            for tag, value in shared.items():
                image.SetMetaData(tag, value)
            image.SetMetaData("0008|0018", generate_uid())  # SOPInstanceUID
            image.SetMetaData("0020|0013", str(k + 1))  # InstanceNumber
            image.SetMetaData("0020|0032", _ds(*position))  # ImagePositionPatient
            image.SetMetaData("0020|1041", _ds(float(position @ normal)))  # SliceLocation
            writer.SetFileName(str(staging / f"slice_{k:0{width}d}.dcm"))
            writer.Execute(image)
        _move_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# Patient and study attributes a derived series copies from its source (tag -> keyword).
_STUDY_TAGS = {
    "0010|0010": "PatientName", "0010|0020": "PatientID", "0010|0030": "PatientBirthDate", "0010|0040": "PatientSex",
    "0020|000d": "StudyInstanceUID", "0008|0020": "StudyDate", "0008|0030": "StudyTime", "0020|0010": "StudyID",
    "0008|0050": "AccessionNumber", "0008|1030": "StudyDescription", "0020|0052": "FrameOfReferenceUID",
}  # fmt: skip


def _study_of(source: Volume | None) -> dict[str, str]:
    """The patient, study and frame-of-reference tags of `source`'s first slice (nothing for a non-DICOM source)."""
    files = (source.meta.get("slice_files") or []) if source is not None else []
    if not files:
        return {}
    import pydicom

    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {tag: str(header.get(keyword)) for tag, keyword in _STUDY_TAGS.items() if header.get(keyword) is not None}


def _ds(*values: float) -> str:
    """DICOM decimal string(s): at most 16 characters each, as many digits as fit, backslash-separated."""
    from pydicom.valuerep import format_number_as_ds

    return "\\".join(format_number_as_ds(float(value)) for value in values)


def _check_dicom_target(folder: Path) -> None:
    """Refuse a target that is not new, empty, or a series `write_dicom_series` wrote before."""
    expected = "a new or empty folder, or a DICOM series folder written by mednets"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise InvalidInputError("DICOM series target exists and is not a folder", source=str(folder), expected=expected)
    if not folder.exists():
        return
    import pydicom

    for entry in sorted(folder.iterdir()):
        ours = entry.is_file() and not entry.is_symlink() and _DICOM_SLICE_NAME.fullmatch(entry.name) is not None
        if ours:
            try:
                header = pydicom.dcmread(entry, stop_before_pixels=True, specific_tags=["SoftwareVersions"])
                ours = str(header.get("SoftwareVersions", "")).startswith(_DICOM_SOFTWARE)
            except Exception:  # not DICOM at all: someone else's file
                ours = False
        if not ours:
            raise InvalidInputError(
                "folder holds files that are not a mednets DICOM series; not replacing it",
                source=str(folder),
                expected=expected,
                got=entry.name,
            )


def _dicom_pixels(array: np.ndarray, folder: Path) -> tuple[np.ndarray, float, float]:
    """Stored int16 pixels and the (slope, intercept) mapping them back (rule: `write_dicom_series`)."""
    if array.dtype.kind in "iub":
        lo, hi = int(array.min()), int(array.max())
        integral = True
    elif array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InvalidInputError("DICOM pixels must be finite", source=str(folder), got="NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        integral = bool(np.all(array == np.round(array)))
    else:
        raise InvalidInputError("DICOM holds real numbers only", source=str(folder), got=str(array.dtype))
    if integral and lo >= -32768 and hi <= 32767:
        return array.astype(np.int16, copy=False), 1.0, 0.0
    if integral and hi - lo <= 65535 and max(abs(lo), abs(hi)) < 2**53:  # float64 and DS hold these exactly
        intercept = float(lo + 32768)
        return (array - intercept).astype(np.int16), 1.0, intercept
    # Quantise with slope and intercept as a reader parses them back from their decimal strings, so
    # the error stays within slope / 2 whatever digits the 16-character limit dropped.
    slope = float(_ds((hi - lo) / 65535)) if hi > lo else 1.0
    intercept = float(_ds(lo + 32768 * slope))
    stored = np.clip(np.round((array.astype(np.float64) - intercept) / slope), -32768, 32767)
    return stored.astype(np.int16), slope, intercept


def _dicom_geometry(affine: np.ndarray, depth: int, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """LPS spacing, origin, direction columns (i, j, k) for DICOM, and whether the slice axis was reversed."""
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInputError("affine is singular or not finite", source=str(folder), got=affine.tolist())
    spacing_xyz, origin_xyz, direction = itk_geometry(affine)
    spacing = np.asarray(spacing_xyz)
    origin = np.asarray(origin_xyz)
    axes = np.asarray(direction).reshape(3, 3)  # row-major like ITK: column c is index axis c's direction
    # ImageOrientationPatient needs orthogonal row and column directions, and slice positions only
    # carry the normal: a sheared affine would come back different.
    deviation = float(np.abs(axes.T @ axes - np.eye(3)).max())
    if deviation > _DICOM_GEOMETRY_TOLERANCE:
        raise InvalidInputError(
            "DICOM cannot store a sheared affine",
            source=str(folder),
            expected=f"orthogonal axes (within {_DICOM_GEOMETRY_TOLERANCE})",
            got=f"deviation {deviation:.2g}",
        )
    reverse = float(np.cross(axes[:, 0], axes[:, 1]) @ axes[:, 2]) < 0
    if reverse:  # left-handed: start from the last slice and step along the normal
        origin = origin + (depth - 1) * spacing[2] * axes[:, 2]
        axes[:, 2] = -axes[:, 2]
    return spacing, origin, axes, reverse


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename the finished `staging` folder to `folder`, replacing an old series only once the new one is in."""
    if not folder.exists() and not folder.is_symlink():
        os.rename(staging, folder)
        return
    _check_dicom_target(folder)  # again: files may have appeared while the slices were written
    retired = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.old"
    os.rename(folder, retired)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(retired, folder)  # put the previous series back
        raise
    # The new series is in place; failing to delete the old copy must not fail the write.
    shutil.rmtree(retired, ignore_errors=True)


def software_version() -> str:
    """This package's version from its installed metadata: importing `mednets` itself would load every model."""
    try:
        return importlib.metadata.version("mednets")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
