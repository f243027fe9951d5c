"""The `Volume` type (a voxel array with its affine) and the geometry conventions every reader keeps.

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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednets.errors import InvalidInputError

__all__ = ["GZIP_MAX_RATIO", "RAS_TO_LPS", "Volume", "affine_from_itk", "check_voxel_count", "itk_geometry", "itk_image",
           "max_voxels", "volume_file_array"]  # fmt: skip

# The most voxels a header may claim (2**31: about 8 GiB of float32) unless MEDNETS_MAX_VOXELS says otherwise.
DEFAULT_MAX_VOXELS = 2**31
GZIP_MAX_RATIO = 1032  # deflate's largest compression ratio

# RAS <-> LPS: negate the first two world axes.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
        from nibabel import orientations

        if self.channel_axis is not None or self.array.ndim != 3:
            raise InvalidInputError("only 3D volumes can be reoriented", source="Volume", got=self.array.shape)
        data_xyz = self.array.transpose(2, 1, 0)
        current = orientations.io_orientation(self.affine)
        target = orientations.axcodes2ornt(tuple(codes))
        transform = orientations.ornt_transform(current, target)
        new_xyz = orientations.apply_orientation(data_xyz, transform)
        affine = self.affine @ orientations.inv_ornt_aff(transform, data_xyz.shape)
        return Volume(np.ascontiguousarray(new_xyz.transpose(2, 1, 0)), affine, None, dict(self.meta))


def affine_from_itk(image: Any) -> np.ndarray:
    """RAS+ affine of a 3D SimpleITK image (LPS spacing, origin and direction)."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = image.GetOrigin()
    return RAS_TO_LPS @ lps


def itk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """The inverse of `affine_from_itk`: LPS ``(spacing, origin, direction)`` with direction row-major."""
    lps = RAS_TO_LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


def itk_image(array: np.ndarray, affine: np.ndarray) -> Any:
    """A 3D SimpleITK image of `array` ``[D, H, W]`` with the LPS geometry of the RAS+ `affine` (`itk_geometry`)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, origin, direction = itk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volume_file_array(volume: Volume, path: Path) -> np.ndarray:
    """The array a volume file (NIfTI, ITK, DICOM) stores: 3D single-channel, in a dtype readers accept.

    Raises:
        InvalidInputError: the array is not 3D or has a channel axis.
    """
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


def max_voxels() -> int:
    """The most voxels mednets reads or makes from one file: MEDNETS_MAX_VOXELS, default 2**31."""
    return int(os.environ.get("MEDNETS_MAX_VOXELS", DEFAULT_MAX_VOXELS))


def check_voxel_count(path: str | os.PathLike[str], shape: tuple[int, ...]) -> int:
    """Refuse a header claiming more voxels than MEDNETS_MAX_VOXELS (default 2**31), before anything is
    allocated; returns the count."""
    voxels = math.prod(shape)  # Python integers: no overflow whatever the header claims
    limit = max_voxels()
    if voxels > limit:
        raise InvalidInputError("the header claims more voxels than mednets reads", source=str(path),
                                expected=f"at most {limit} (MEDNETS_MAX_VOXELS)", got=f"{shape}: {voxels}")  # fmt: skip
    return voxels
