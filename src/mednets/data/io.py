"""The format table: the file endings mednets reads and writes, and the functions that dispatch on them.

One reader-writer per format sits beside this module: `mednets.data.nifti_itk` (NIfTI, NRRD, MHA,
MHD), `mednets.data.dicom` (DICOM series folders) and `mednets.data.images` (PNG, JPEG, TIFF, SVS).
Arrays and affines follow the conventions of `mednets.data.volume`.

Errors: anything unreadable, truncated or inconsistent raises `InvalidInputError` naming the file.
Writes are atomic: a temporary file in the target folder is renamed over the target, so an error
leaves no partial file behind. A DICOM series (a path with no suffix, or an existing folder) is
written into a temporary sibling folder that is then renamed into place.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mednets.data.dicom import find_dicom_series, read_dicom_series, write_dicom_series
from mednets.data.images import first_level, read_pillow, read_tiff, to_unit_range, write_pillow, write_tiff
from mednets.data.nifti_itk import (
    read_itk,
    read_itk_geometry,
    read_nifti,
    read_nifti_geometry,
    write_itk,
    write_metaimage,
    write_nifti,
)
from mednets.errors import InvalidInputError

if TYPE_CHECKING:
    from mednets.data.volume import Volume

__all__ = [
    "DICOM_SUFFIX",
    "IMAGE_SUFFIXES",
    "InputCase",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PILLOW_SUFFIXES",
    "TIFF_SUFFIXES",
    "VOLUME_SUFFIXES",
    "case_name",
    "list_cases",
    "list_image_files",
    "list_inputs",
    "read_any",
    "read_geometry",
    "read_image",
    "read_image_2d",
    "read_rgb",
    "read_volume",
    "write_volume",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES
# A single slice file stands for the series in its folder.
DICOM_SUFFIX = ".dcm"
# MetaImage writes a header and a separate data file, so it needs its own writer.
_METAIMAGE_SUFFIX = ".mhd"
# SVS is read only: a whole-slide pyramid is not something mednets writes.
_WRITABLE_TIFF_SUFFIXES = (".tif", ".tiff")
_CHANNEL_SUFFIX = "_0000"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def case_name(path: str | os.PathLike[str]) -> str:
    """The case a file or DICOM folder holds: its name without a known file ending and channel suffix.

    A known ending (`VOLUME_SUFFIXES`, `IMAGE_SUFFIXES`, any letter case) is removed, then a trailing
    nnU-Net channel suffix ``_0000``: ``a/b/case_0000.nii.gz`` gives ``case``, ``scan.png`` gives ``scan``,
    ``case.seg.nrrd`` gives ``case``.
    """
    name = Path(path).name
    suffix = _suffix(Path(name))
    if suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        name = name[: -len(suffix)]
        if suffix == ".nrrd":  # a 3D Slicer segmentation, `<case>.seg.nrrd`
            name = name.removesuffix(".seg")
    return name.removesuffix(_CHANNEL_SUFFIX)


def read_volume(path: str | os.PathLike[str], *, series_uid: str | None = None) -> Volume:
    """Read a volume or image file, or a DICOM series folder, into a `Volume`.

    Args:
        path: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` file, a folder holding one
            DICOM series, or a 2D image (``.png``, ``.jpg``, ``.tif``/``.tiff`` incl. multi-page, ``.svs``).
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to read.

    Returns:
        The `Volume` (see `mednets.data.volume` for axis order and affine convention).

    Raises:
        InvalidInputError: the file is missing, of an unknown type, corrupt, truncated or inconsistent.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid)
    if not path.is_file():
        raise InvalidInputError("file not found", source=str(path))
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path)
    if suffix in ITK_SUFFIXES:
        return read_itk(path, suffix.lstrip("."))
    if suffix in IMAGE_SUFFIXES:
        return read_image(path)
    if suffix == DICOM_SUFFIX:
        return read_dicom_series(path.parent, series_uid=series_uid)
    raise InvalidInputError(
        "unknown file type",
        source=str(path),
        expected=", ".join(VOLUME_SUFFIXES + IMAGE_SUFFIXES) + " or a DICOM folder",
    )


def read_geometry(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and affine of a file, from its header alone for NIfTI, NRRD, MHA and MHD.

    Other files (2D images, DICOM) are read whole, as `read_volume` reads them.

    Returns:
        (``Volume.spatial_shape``, ``Volume.affine``) of the file as `read_volume` would give it.

    Raises:
        InvalidInputError: what `read_volume` refuses before reading voxels.
    """
    path = Path(path)
    if path.is_file() and _suffix(path) in NIFTI_SUFFIXES:
        return read_nifti_geometry(path)
    if path.is_file() and _suffix(path) in ITK_SUFFIXES:
        return read_itk_geometry(path)
    volume = read_volume(path)
    return volume.spatial_shape, volume.affine


def read_image(path: str | os.PathLike[str]) -> Volume:
    """Read a 2D image: PNG/JPEG through Pillow, TIFF (multi-page too) and SVS level 0 through tifffile.

    Returns:
        A `Volume` with ``array`` ``[H, W]``, ``[H, W, C]`` (``channel_axis=-1``) or ``[N, H, W(, C)]``
        for multi-page TIFFs, and an identity affine.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError("file not found", source=str(path))
    suffix = _suffix(path)
    if suffix in TIFF_SUFFIXES:
        return read_tiff(path, suffix.lstrip("."))
    return read_pillow(path, suffix.lstrip("."))


def read_image_2d(path: str | os.PathLike[str]) -> Volume:
    """Read level 0 of a PNG, JPEG, TIFF or SVS file: ``array`` ``[H, W]`` or ``[H, W, C]`` (``channel_axis=-1``).

    Raises:
        InvalidInputError: unreadable file, or not an image.
    """
    return first_level(read_image(path), str(path))


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Level 0 of an image file as RGB float32 ``[3, H, W]`` in [0, 1] (grey repeated, alpha dropped)."""
    volume = read_image_2d(path)
    array = to_unit_range(volume.array, source=str(path))
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.shape[-1] in (1, 2):  # grey, grey + alpha
        array = np.repeat(array[..., :1], 3, axis=-1)
    return np.ascontiguousarray(array[..., :3].transpose(2, 0, 1))


def read_any(path: str | os.PathLike[str]) -> Volume:
    """Read a 2D image as `read_image_2d` does (level 0) and anything else (volumes, DICOM) as `read_volume`.

    Raises:
        InvalidInputError: the file is missing, of an unknown type, corrupt, truncated or inconsistent.
    """
    if not Path(path).is_dir() and _suffix(Path(path)) in IMAGE_SUFFIXES:
        return read_image_2d(path)
    return read_volume(path)


def list_image_files(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    """Image files among `paths`: files as given, folders expanded to their image files (sorted, not recursive, not hidden).

    Raises:
        InvalidInputError: a path does not exist, or a folder holds no image file.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files = sorted(p for p in _visible_files(item) if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InvalidInputError(
                    "folder holds no image file", source=str(item), expected=", ".join(IMAGE_SUFFIXES)
                )
            found.extend(files)
        elif item.is_file():
            found.append(item)
        else:
            raise InvalidInputError("file or folder not found", source=str(item))
    return found


def _visible_files(folder: Path) -> list[Path]:
    """The files of `folder` that are not hidden: macOS leaves `.DS_Store` and `._<name>` copies beside real files."""
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def list_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files and DICOM folders to predict: a folder holding volume or image files expands to them (sorted, not hidden).

    A folder without such files stays as it is (a DICOM series); a missing path is kept for its reader to report.
    """
    known = VOLUME_SUFFIXES + IMAGE_SUFFIXES
    found: list[Path] = []
    for item in map(Path, paths):
        files = sorted(p for p in _visible_files(item) if _suffix(p) in known) if item.is_dir() else []
        found.extend(files or [item])
    return found


def write_volume(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write `volume` to `path`, choosing the format by extension; atomic (no partial file on error).

    Volumes (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ``.mhd``) keep their affine; 2D images
    (``.png``, ``.jpg``, ``.tif``/``.tiff``) keep their pixels. NIfTI stores the affine in float32
    (the format's limit); the ITK formats store it in double precision.

    A path with no suffix (``out/case01``) or an existing folder is a DICOM series folder, the
    mirror of `read_volume` reading a folder: see `mednets.data.dicom.write_dicom_series` for the
    pixel rule, the geometry precision and when an existing folder is replaced.

    Returns:
        The written path.

    Raises:
        InvalidInputError: unknown extension or an array the format cannot hold.
    """
    path = Path(path)
    suffix = _suffix(path)
    if path.is_dir() or suffix == "":
        return write_dicom_series(volume, path)
    if suffix in NIFTI_SUFFIXES:
        write_nifti(volume, path)
    elif suffix == _METAIMAGE_SUFFIX:
        write_metaimage(volume, path)
    elif suffix in ITK_SUFFIXES:
        write_itk(volume, path)
    elif suffix in PILLOW_SUFFIXES:
        write_pillow(volume, path, "PNG" if suffix == ".png" else "JPEG")
    elif suffix in _WRITABLE_TIFF_SUFFIXES:
        write_tiff(volume, path)
    else:
        raise InvalidInputError(
            "cannot write this file type",
            source=str(path),
            expected=", ".join((*VOLUME_SUFFIXES, ".png", ".jpg", ".tif", ".tiff")) + " or a DICOM folder (no suffix)",
        )
    return path


@dataclass(frozen=True)
class InputCase:
    """One image to predict: a file, or a DICOM series (its folder and SeriesInstanceUID), and its output name."""

    path: Path
    name: str
    series_uid: str | None = None

    def read(self) -> Volume:
        """The image (`read_any`; for a DICOM series, that series of its folder)."""
        return read_volume(self.path, series_uid=self.series_uid) if self.series_uid else read_any(self.path)


def list_cases(paths: Sequence[str | os.PathLike[str]], *, series_uid: str | None = None) -> list[InputCase]:
    """The cases among `paths`: image files, folders of them, and the DICOM series in a folder and its subfolders.

    A folder with no volume or image file is walked for DICOM series: one series in a folder is named
    after the folder's path below the given one (``root/patient1/ct`` -> ``patient1_ct``), several
    series in one folder after their UIDs; `series_uid` keeps only that series.

    Raises:
        InvalidInputError: `series_uid` matches no series under the given folders.
    """
    cases: list[InputCase] = []
    for item in map(Path, paths):
        files = list_inputs([item])
        if files != [item] or not item.is_dir():
            cases.extend(InputCase(path, case_name(path)) for path in files)
            continue
        series = find_dicom_series(item)
        per_folder = Counter(folder for folder, _ in series)  # series per folder: several are named by UID
        if series_uid is not None:
            series = [(folder, uid) for folder, uid in series if uid == series_uid]
        if not series:  # its reader reports what is wrong with it
            if series_uid is not None:
                raise InvalidInputError("no DICOM series with this UID", source=str(item), got=series_uid)
            cases.append(InputCase(item, case_name(item)))
            continue
        for folder, uid in series:
            relative = folder.relative_to(item).parts
            name = uid if per_folder[folder] > 1 else "_".join(relative) or case_name(item)
            cases.append(InputCase(folder, name, uid))
    return cases
