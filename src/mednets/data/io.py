"""Read and write medical volumes and 2D images with their geometry, in one `Volume` type.

Conventions (every reader and writer converts to and from these):

* `Volume.array` of a 3D volume is ``[D, H, W] = [z, y, x]``: the numpy order of SimpleITK and
  of PyTorch (``[B, C, D, H, W]``). NIfTI data, which nibabel gives as ``[x, y, z]``, is transposed.
* `Volume.affine` is a 4x4 matrix in **RAS+** millimetres (the NIfTI/nibabel convention). It maps
  the voxel index ``(i, j, k, 1)`` with ``i`` along W (x), ``j`` along H (y) and ``k`` along D (z) to
  world coordinates: ``Volume.array[k, j, i]`` sits at ``affine @ [i, j, k, 1]``. So the affine is
  exactly the one nibabel reports for the same file. SimpleITK, ITK and DICOM use **LPS+**; the
  readers and writers flip the first two world axes (``diag(-1, -1, 1)``) on the way in and out.
* `Volume.spacing` is in millimetres in *array* order ``(D, H, W)`` = ``(z, y, x)``.
* `Volume.orientation` is the three-letter axis code of ``(i, j, k)`` as nibabel writes it, e.g.
  ``"RAS"`` or ``"LPS"``: the direction each of x, y, z index axes points to.

2D images (PNG, JPEG, TIFF, SVS level 0) are `Volume`s with ``array`` ``[H, W]`` or ``[H, W, C]``
(``channel_axis=-1``), multi-page TIFFs ``[N, H, W]`` (or ``[N, H, W, C]``), with an identity affine
(1 unit per pixel) because these formats carry no patient geometry.

Errors: anything unreadable, truncated or inconsistent raises `InvalidInputError` naming the file.
Writes are atomic: a temporary file in the target folder is renamed over the target, so an error
leaves no partial file behind. A DICOM series (a path with no suffix, or an existing folder) is
written into a temporary sibling folder that is then renamed into place.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednets.atomic import atomic_path
from mednets.errors import InvalidInputError

__all__ = [
    "IMAGE_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Volume",
    "read_dicom_series",
    "read_image",
    "read_volume",
    "write_dicom_series",
    "write_volume",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs")

# RAS <-> LPS: negate the first two world axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# DICOM series written by `write_dicom_series`: one file per slice with this name, and this
# SoftwareVersions (0018,1020) prefix. Both must match before an existing folder is replaced, so a
# folder of someone else's files is never deleted.
_DICOM_SLICE_NAME = re.compile(r"slice_\d+\.dcm")
_DICOM_SOFTWARE = "mednets"
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Largest deviation from orthonormal directions (and from a slice axis along the row x column
# normal) accepted: float32 NIfTI affines are orthonormal only to about 1e-7.
_DICOM_GEOMETRY_TOLERANCE = 1e-4


@dataclass
class Volume:
    """A voxel array with its geometry.

    Attributes:
        array: ``[D, H, W]`` for volumes; ``[H, W]``, ``[H, W, C]`` or ``[N, H, W(, C)]`` for images.
        affine: 4x4 RAS+ matrix mapping ``(x, y, z) = (W, H, D)`` index to millimetres.
        channel_axis: axis holding colour channels (-1 for RGB/RGBA images), None for none.
        meta: where the data came from (``source``, ``format``) and format-specific extras.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    channel_axis: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise InvalidInputError("affine must be 4x4", source="Volume.affine", got=self.affine.shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape without the channel axis, e.g. ``(D, H, W)``."""
        shape = list(self.array.shape)
        if self.channel_axis is not None:
            del shape[self.channel_axis]
        return tuple(shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm in array order (``(D, H, W)`` for 3D, ``(H, W)`` for 2D)."""
        xyz = np.linalg.norm(self.affine[:3, :3], axis=0)  # spacing along i (x), j (y), k (z)
        return tuple(float(v) for v in xyz[: len(self.spatial_shape)][::-1])

    @property
    def orientation(self) -> str:
        """Axis code of the (x, y, z) index axes, e.g. ``"RAS"`` or ``"LPS"``."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def reoriented(self, codes: str = "LPS") -> Volume:
        """Return the volume with its axes permuted/flipped so the index axes point to `codes`.

        With ``"LPS"`` (the default used for display) an axial slice ``array[k]`` shows the patient's
        right on the image left and anterior at the top, the radiological convention.
        """
        import nibabel as nib
        from nibabel import orientations

        if self.channel_axis is not None or self.array.ndim != 3:
            raise InvalidInputError("only 3D volumes can be reoriented", source="Volume", got=self.array.shape)
        data_xyz = self.array.transpose(2, 1, 0)
        current = orientations.io_orientation(self.affine)
        target = orientations.axcodes2ornt(tuple(codes))
        transform = orientations.ornt_transform(current, target)
        new_xyz = orientations.apply_orientation(data_xyz, transform)
        affine = self.affine @ orientations.inv_ornt_aff(transform, data_xyz.shape)
        del nib
        return Volume(np.ascontiguousarray(new_xyz.transpose(2, 1, 0)), affine, None, dict(self.meta))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def read_volume(path: str | os.PathLike[str], *, series_uid: str | None = None) -> Volume:
    """Read a volume or image file, or a DICOM series folder, into a `Volume`.

    Args:
        path: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` file, a folder holding one
            DICOM series, or a 2D image (``.png``, ``.jpg``, ``.tif``/``.tiff`` incl. multi-page, ``.svs``).
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to read.

    Returns:
        The `Volume` (see the module docstring for axis order and affine convention).

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
        return _read_nifti(path)
    if suffix in ITK_SUFFIXES:
        return _read_itk(path)
    if suffix in IMAGE_SUFFIXES:
        return read_image(path)
    if suffix == ".dcm":
        return read_dicom_series(path.parent, series_uid=series_uid)
    raise InvalidInputError(
        "unknown file type",
        source=str(path),
        expected=", ".join(VOLUME_SUFFIXES + IMAGE_SUFFIXES) + " or a DICOM folder",
    )


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)  # forces decompression: truncation shows up here
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise InvalidInputError(f"cannot read NIfTI file: {error}", source=str(path)) from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidInputError("NIfTI volume must be 3D", source=str(path), expected="3 dimensions", got=data.shape)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInputError("NIfTI affine is singular or not finite", source=str(path), got=affine.tolist())
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    return Volume(array, affine, None, {"source": str(path), "format": "nifti"})


def _affine_from_itk(image: Any) -> np.ndarray:
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = image.GetOrigin()
    return _RAS_TO_LPS @ lps


def _itk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    lps = _RAS_TO_LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
    except Exception as error:  # SimpleITK raises RuntimeError with ITK's message
        raise InvalidInputError(f"cannot read file: {_first_line(error)}", source=str(path)) from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidInputError(
            "expected a 3D single-channel volume",
            source=str(path),
            got=f"{image.GetDimension()}D, {image.GetNumberOfComponentsPerPixel()} components",
        )
    return Volume(array, _affine_from_itk(image), None, {"source": str(path), "format": _suffix(path).lstrip(".")})


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with a file:line location; the useful text is the last line.
    return lines[-1] if lines else type(error).__name__


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
        affine = _affine_from_itk(image)
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
        "reader": reader_name,
    }
    return Volume(array, affine, None, meta)


def _slice_geometry(files: list[str], folder: Path) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]:
    """Headers, orientation rows/cols, pixel spacing and positions of the slices (LPS)."""
    import pydicom

    headers = []
    for name in files:
        try:
            headers.append(pydicom.dcmread(name, stop_before_pixels=True))
        except Exception as error:
            raise InvalidInputError(f"cannot read DICOM header: {error}", source=name) from error
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
    return array, _RAS_TO_LPS @ lps


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
    try:
        if suffix in (".tif", ".tiff", ".svs"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                series = tif.series[0]
                # SVS and pyramidal TIFFs: level 0 is full resolution; several pages form a stack.
                level = series.levels[0]
                array = level.asarray()
                has_channels = level.axes.endswith("S")  # tifffile's axis code for samples (RGB)
        else:
            from PIL import Image

            with Image.open(str(path)) as image:
                image.load()
                array = np.asarray(image)
                has_channels = image.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr")
    except Exception as error:
        raise InvalidInputError(f"cannot read image: {error}", source=str(path)) from error
    channel_axis = -1 if has_channels and array.ndim >= 3 else None
    return Volume(np.asarray(array), np.eye(4), channel_axis, {"source": str(path), "format": suffix.lstrip(".")})


def write_volume(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write `volume` to `path`, choosing the format by extension; atomic (no partial file on error).

    Volumes (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ``.mhd``) keep their affine; 2D images
    (``.png``, ``.jpg``, ``.tif``/``.tiff``) keep their pixels. NIfTI stores the affine in float32
    (the format's limit); the ITK formats store it in double precision.

    A path with no suffix (``out/case01``) or an existing folder is a DICOM series folder, the
    mirror of `read_volume` reading a folder: see `write_dicom_series` for the pixel rule, the
    geometry precision and when an existing folder is replaced.

    Returns:
        The written path.

    Raises:
        InvalidInputError: unknown extension or an array the format cannot hold.
    """
    path = Path(path)
    suffix = _suffix(path)
    if path.is_dir() or suffix == "":
        return write_dicom_series(volume, path)
    if suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        array = _volume_array(volume, path)
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(array, volume.affine, path)
        elif suffix == ".mhd":
            _write_mhd(array, volume.affine, path)
        else:
            with atomic_path(path) as temporary:
                _write_itk(array, volume.affine, temporary, compress=True)
        return path
    if suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        _write_image(volume, path, suffix)
        return path
    raise InvalidInputError(
        "cannot write this file type",
        source=str(path),
        expected=", ".join((*VOLUME_SUFFIXES, ".png", ".jpg", ".tif", ".tiff")) + " or a DICOM folder (no suffix)",
    )


def _volume_array(volume: Volume, path: Path) -> np.ndarray:
    array = np.asarray(volume.array)
    if array.ndim != 3 or volume.channel_axis is not None:
        raise InvalidInputError("a volume file needs a 3D single-channel array", source=str(path), got=array.shape)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.int64 and array.size and array.min() >= -(2**31) and array.max() < 2**31:
        array = array.astype(np.int32)  # NIfTI readers widely reject int64
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    return array


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    image.header.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))


def _write_itk(array: np.ndarray, affine: np.ndarray, path: Path, *, compress: bool) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, origin, direction = _itk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=compress)


def _write_mhd(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """MetaImage header + raw data file: write both under the final names in a temporary folder, then move."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_itk(array, affine, staging / path.name, compress=False)
        written = sorted(staging.iterdir(), key=lambda p: p.suffix == ".mhd")  # data file first, header last
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_image(volume: Volume, path: Path, suffix: str) -> None:
    array = np.asarray(volume.array)
    with atomic_path(path) as temporary:
        if suffix in (".tif", ".tiff"):
            import tifffile

            photometric = "rgb" if volume.channel_axis is not None and array.shape[-1] in (3, 4) else "minisblack"
            tifffile.imwrite(str(temporary), array, photometric=photometric)
        else:
            from PIL import Image

            if array.ndim not in (2, 3):
                raise InvalidInputError("a PNG/JPEG holds one 2D image", source=str(path), got=array.shape)
            Image.fromarray(array).save(str(temporary), format="PNG" if suffix == ".png" else "JPEG", quality=95)


def write_dicom_series(volume: Volume, folder: str | os.PathLike[str]) -> Path:
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

    Args:
        volume: a 3D single-channel volume, `array` ``[D, H, W]`` with finite values.
        folder: the series folder to create or replace.

    Returns:
        The folder.

    Raises:
        InvalidInputError: the array is not 3D single-channel, not real or not finite; the affine is
            singular or sheared (axes not orthogonal); or `folder` is a file or a folder of other files.
    """
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    from mednets import __version__

    folder = Path(folder)
    _check_dicom_target(folder)  # before any work: a refused target must cost nothing and leave nothing
    array = _volume_array(volume, folder)
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
        "0018|1020": f"{_DICOM_SOFTWARE} {__version__}",  # SoftwareVersions: marks folders we may replace
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
    spacing_xyz, origin_xyz, direction = _itk_geometry(affine)
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
