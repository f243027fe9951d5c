"""NIfTI (nibabel) and NRRD/MHA/MHD (SimpleITK) volumes: read into a `Volume` and write atomically.

`mednets.data.io` chooses among these by file ending; the geometry conventions are those of
`mednets.data.volume` (``[D, H, W]`` arrays, RAS+ affines; ITK's LPS is converted on the way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mednets.atomic import atomic_path
from mednets.data.volume import Volume, affine_from_itk, itk_geometry, volume_file_array
from mednets.errors import InvalidInputError

# The most voxels a header may claim (about 8 GiB of float32); MEDNETS_MAX_VOXELS overrides it.
MAX_VOXELS = int(os.environ.get("MEDNETS_MAX_VOXELS", 2**31))
_GZIP_MAX_RATIO = 1032  # deflate's largest compression ratio

__all__ = ["read_itk", "read_nifti", "write_itk", "write_metaimage", "write_nifti"]


def _check_claimed_size(path: Path, image: Any) -> None:
    """Refuse a header whose voxels cannot be in the file, or exceed `MAX_VOXELS`, before any is read.

    A 69-byte file can claim 1200³ voxels; reading it would allocate gigabytes before failing. An
    uncompressed file must hold the claimed bytes; gzip cannot shrink data more than about 1032 to 1,
    whatever its members, so a compressed file far smaller than that is corrupt.
    """
    shape = tuple(int(n) for n in image.shape)
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise InvalidInputError("the header claims more voxels than mednets reads", source=str(path),
                                expected=f"at most {MAX_VOXELS} (MEDNETS_MAX_VOXELS)", got=f"{shape}: {voxels}")  # fmt: skip
    claimed = voxels * image.get_data_dtype().itemsize + int(getattr(image.dataobj, "offset", 0))
    size = path.stat().st_size
    possible = size * _GZIP_MAX_RATIO if str(path).lower().endswith(".gz") else size
    if possible < claimed:
        raise InvalidInputError("the header's voxels cannot fit in the file (truncated or corrupt)", source=str(path),
                                expected=f"{claimed} bytes of voxels", got=f"a file of {size} bytes")  # fmt: skip


def read_nifti(path: Path) -> Volume:
    """Read a 3D NIfTI file (a 4D one with a single volume too); the array is transposed to ``[D, H, W]``.

    Raises:
        InvalidInputError: corrupt, truncated or not 3D, or a singular or non-finite affine.
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types (ImageFileError, HeaderDataError, ...)
        raise InvalidInputError(f"cannot read NIfTI file: {error}", source=str(path)) from error
    _check_claimed_size(path, image)
    try:
        data = np.asanyarray(image.dataobj)  # forces decompression: truncation shows up here
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise InvalidInputError(f"cannot read NIfTI file: {error}", source=str(path)) from error
    if data.dtype.fields is not None or not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
                                             or data.dtype == bool):  # fmt: skip
        raise InvalidInputError("NIfTI voxels must be plain numbers of one channel (RGB or complex voxels are not "
                                "images mednets segments)", source=str(path), expected="an integer or float dtype",
                                got=str(data.dtype))  # fmt: skip
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidInputError("NIfTI volume must be 3D", source=str(path), expected="3 dimensions", got=data.shape)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInputError("NIfTI affine is singular or not finite", source=str(path), got=affine.tolist())
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    return Volume(array, affine, None, {"source": str(path), "format": "nifti"})


def read_itk(path: Path, file_format: str) -> Volume:
    """Read a 3D single-channel NRRD, MHA or MHD file with SimpleITK.

    Args:
        path: the file.
        file_format: its format name for ``meta["format"]``, e.g. ``"nrrd"``.

    Raises:
        InvalidInputError: unreadable, or not a 3D single-channel volume.
    """
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
    return Volume(array, affine_from_itk(image), None, {"source": str(path), "format": file_format})


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with a file:line location; the useful text is the last line.
    return lines[-1] if lines else type(error).__name__


def write_nifti(volume: Volume, path: Path) -> None:
    """Write a 3D volume as NIfTI (sform and qform set to the affine, stored in float32 by the format).

    Raises:
        InvalidInputError: the array is not 3D single-channel.
    """
    import nibabel as nib

    array = volume_file_array(volume, path)
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), volume.affine)
    image.header.set_data_dtype(array.dtype)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))


def write_itk(volume: Volume, path: Path) -> None:
    """Write a 3D volume as one compressed SimpleITK file (NRRD, MHA), the affine in double precision.

    Raises:
        InvalidInputError: the array is not 3D single-channel.
    """
    array = volume_file_array(volume, path)
    with atomic_path(path) as temporary:
        _write_sitk(array, volume.affine, temporary, compress=True)


def write_metaimage(volume: Volume, path: Path) -> None:
    """Write a 3D volume as a MetaImage header (``.mhd``) and its raw data file beside it.

    Both files are written under their final names in a temporary folder, then moved, data first.

    Raises:
        InvalidInputError: the array is not 3D single-channel.
    """
    array = volume_file_array(volume, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_sitk(array, volume.affine, staging / path.name, compress=False)
        written = sorted(staging.iterdir(), key=lambda item: item.name == path.name)  # data file first, header last
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_sitk(array: np.ndarray, affine: np.ndarray, path: Path, *, compress: bool) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, origin, direction = itk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=compress)
