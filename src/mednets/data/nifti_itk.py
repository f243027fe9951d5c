"""NIfTI (nibabel) and NRRD/MHA/MHD (SimpleITK) volumes: read into a `Volume` and write atomically.

`mednets.data.io` chooses among these by file ending; the geometry conventions are those of
`mednets.data.volume` (``[D, H, W]`` arrays, RAS+ affines; ITK's LPS is converted on the way).
Every header is checked before any voxel is read (dimensions, voxel type, voxel count, a finite and
invertible affine), so `read_nifti_geometry` and `read_itk_geometry` refuse what the readers refuse.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from mednets.atomic import atomic_path
from mednets.data.volume import (
    GZIP_MAX_RATIO,
    Volume,
    affine_from_itk,
    check_voxel_count,
    itk_image,
    volume_file_array,
)
from mednets.errors import InvalidInputError

__all__ = [
    "read_itk",
    "read_itk_geometry",
    "read_nifti",
    "read_nifti_geometry",
    "write_itk",
    "write_metaimage",
    "write_nifti",
]


def _check_claimed_size(path: Path, image: Any) -> None:
    """Refuse a NIfTI header whose voxels cannot be in the file, or are too many, before any is read.

    A 69-byte file can claim 1200³ voxels; reading it would allocate gigabytes before failing. An
    uncompressed file must hold the claimed bytes; gzip cannot shrink data more than about 1032 to 1,
    whatever its members, so a compressed file far smaller than that is corrupt.
    """
    voxels = check_voxel_count(path, tuple(int(n) for n in image.shape))
    claimed = voxels * image.get_data_dtype().itemsize + int(getattr(image.dataobj, "offset", 0))
    size = path.stat().st_size
    possible = size * GZIP_MAX_RATIO if str(path).lower().endswith(".gz") else size
    if possible < claimed:
        raise InvalidInputError("the header's voxels cannot fit in the file (truncated or corrupt)", source=str(path),
                                expected=f"{claimed} bytes of voxels", got=f"a file of {size} bytes")  # fmt: skip


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInputError("the affine is singular or not finite", source=str(path), got=affine.tolist())


def _open_nifti(path: Path) -> tuple[Any, np.ndarray]:
    """The nibabel image of a 3D NIfTI file and its affine, the header checked and no voxel read yet."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        affine = np.asarray(image.affine, dtype=np.float64)
        dtype = image.get_data_dtype()
    except Exception as error:  # nibabel raises many types (ImageFileError, HeaderDataError, ...)
        raise InvalidInputError(f"cannot read NIfTI file: {error}", source=str(path)) from error
    if dtype.kind not in "biuf":  # bool, signed, unsigned, float; not RGB (structured) or complex
        raise InvalidInputError("NIfTI voxels must be plain numbers of one channel (RGB or complex voxels are not "
                                "images mednets segments)", source=str(path), expected="an integer or float dtype",
                                got=str(dtype))  # fmt: skip
    if not (len(image.shape) == 3 or (len(image.shape) == 4 and image.shape[3] == 1)):
        raise InvalidInputError("NIfTI volume must be 3D", source=str(path), expected="3 dimensions", got=image.shape)
    _check_claimed_size(path, image)
    _check_affine(path, affine)
    return image, affine


def read_nifti_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape ``[D, H, W]`` and affine of a 3D NIfTI file from its header alone (no voxel is read).

    Raises:
        InvalidInputError: what `read_nifti` refuses before reading voxels.
    """
    image, affine = _open_nifti(path)
    return tuple(int(n) for n in image.shape[:3][::-1]), affine


def read_nifti(path: Path) -> Volume:
    """Read a 3D NIfTI file (a 4D one with a single volume too); the array is transposed to ``[D, H, W]``.

    Raises:
        InvalidInputError: corrupt, truncated or not 3D, or a singular or non-finite affine.
    """
    image, affine = _open_nifti(path)
    try:
        data = np.asanyarray(image.dataobj)  # forces decompression: truncation shows up here
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise InvalidInputError(f"cannot read NIfTI file: {error}", source=str(path)) from error
    array = np.ascontiguousarray(data.reshape(image.shape[:3]).transpose(2, 1, 0))  # nibabel flattens empty data
    return Volume(array, affine, None, {"source": str(path), "format": "nifti"})


def _open_itk(path: Path) -> tuple[Any, np.ndarray]:
    """A SimpleITK reader of a 3D single-channel file and its RAS+ affine, the header checked and no voxel read yet."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as error:  # SimpleITK raises RuntimeError with ITK's message
        raise InvalidInputError(f"cannot read file: {_itk_message(error)}", source=str(path)) from error
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise InvalidInputError("expected a 3D single-channel volume", source=str(path),
                                got=f"{reader.GetDimension()}D, {reader.GetNumberOfComponents()} components")  # fmt: skip
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InvalidInputError("voxels must be plain numbers (complex voxels are not images mednets segments)",
                                source=str(path), expected="an integer or float type",
                                got=reader.GetPixelIDTypeAsString())  # fmt: skip
    voxels = check_voxel_count(path, tuple(reversed(reader.GetSize())))
    stored = _stored_bytes(path)
    if stored is not None and voxels > stored * GZIP_MAX_RATIO:  # at least a byte per voxel, however compressed
        raise InvalidInputError("the header claims more voxels than the file can hold (truncated or corrupt)",
                                source=str(path), expected=f"at least {voxels // GZIP_MAX_RATIO} bytes of data",
                                got=f"{stored} bytes")  # fmt: skip
    affine = affine_from_itk(reader)
    _check_affine(path, affine)
    return reader, affine


def _stored_bytes(path: Path) -> int | None:
    """Bytes on disk that can hold `path`'s voxels: the file itself, or a MetaImage's one data file; None when unknown."""
    with path.open("rb") as stream:
        head = stream.read(4096).decode("latin-1")
    detached = [line.partition("=")[2].strip() for line in head.splitlines() if line.startswith("ElementDataFile")]
    if detached and detached[0] != "LOCAL":
        data = path.parent / detached[0]
        return data.stat().st_size if data.is_file() else None  # a list or pattern of slice files: not summed
    if any(line.lower().startswith(("data file:", "datafile:")) for line in head.splitlines()):
        return None  # a detached NRRD: its data files are not summed
    return path.stat().st_size


def read_itk_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape ``[D, H, W]`` and affine of a NRRD, MHA or MHD file from its header alone (no voxel is read).

    Raises:
        InvalidInputError: what `read_itk` refuses before reading voxels.
    """
    reader, affine = _open_itk(path)
    return tuple(int(n) for n in reversed(reader.GetSize())), affine


def read_itk(path: Path, file_format: str) -> Volume:
    """Read a 3D single-channel NRRD, MHA or MHD file with SimpleITK.

    Args:
        path: the file.
        file_format: its format name for ``meta["format"]``, e.g. ``"nrrd"``.

    Raises:
        InvalidInputError: unreadable, truncated, or not a 3D single-channel volume of numbers.
    """
    import SimpleITK as sitk

    reader, affine = _open_itk(path)
    try:
        image = reader.Execute()
        array = sitk.GetArrayFromImage(image)
    except Exception as error:  # SimpleITK raises RuntimeError with ITK's message
        raise InvalidInputError(f"cannot read file: {_itk_message(error)}", source=str(path)) from error
    if file_format in ("mha", "mhd"):
        _check_metaimage_data(path, array.nbytes)
    return Volume(array, affine, None, {"source": str(path), "format": file_format})


def _check_metaimage_data(path: Path, expected_bytes: int) -> None:
    """Refuse compressed MetaImage voxels that inflate to fewer bytes than the header claims.

    ITK does not report such a short stream: it leaves the rest of the image as uninitialised memory.
    """
    with path.open("rb") as header:
        fields: dict[str, str] = {}
        for line in iter(header.readline, b""):
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":  # the header's last field: the voxels follow it
                break
        if fields.get("CompressedData", "").lower() != "true":
            return
        data_file = fields.get("ElementDataFile", "")
        if data_file == "LOCAL":
            inflated = _inflated_size(header, path)
        elif (path.parent / data_file).is_file():
            with (path.parent / data_file).open("rb") as data:
                inflated = _inflated_size(data, path)
        else:  # a list or pattern of slice files: ITK has checked what it could
            return
    if inflated < expected_bytes:
        raise InvalidInputError("the compressed voxels end early (truncated or corrupt)", source=str(path),
                                expected=f"{expected_bytes} bytes of voxels", got=f"{inflated} bytes")  # fmt: skip


def _inflated_size(stream: IO[bytes], path: Path) -> int:
    """Bytes a zlib stream inflates to, counted chunk by chunk (the inflated data is not kept)."""
    inflater, total = zlib.decompressobj(), 0
    try:
        while not inflater.eof and (chunk := stream.read(1 << 20)):
            while chunk and not inflater.eof:
                total += len(inflater.decompress(chunk, 1 << 24))
                chunk = inflater.unconsumed_tail
    except zlib.error as error:
        raise InvalidInputError(f"the compressed voxels are corrupt: {error}", source=str(path)) from error
    return total


def _itk_message(error: BaseException) -> str:
    """The useful sentence of an ITK error: the text of its ``ITK ERROR`` line, else its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("ITK ERROR:"):  # "ITK ERROR: MetaImageIO(0x55be...): File cannot be read: ..."
            return line.split("): ", 1)[-1]
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

    sitk.WriteImage(itk_image(array, affine), str(path), useCompression=compress)
