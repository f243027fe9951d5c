"""2D images: PNG/JPEG (Pillow) and TIFF/SVS (tifffile) files, and their pixels as model input.

`mednets.data.io` chooses the reader or writer by file ending. Every 2D task (denoising, 2D
segmentation) then sees the same pixels:

* `first_level` keeps level 0 of an image: the first page of a multi-page TIFF, the full-resolution
  level of an SVS pyramid, as ``[H, W]`` or ``[H, W, C]``. The whole level is read into memory.
* `to_unit_range` / `from_unit_range` map integer pixels to float [0, 1] by their bit depth (uint8:
  /255, uint16: /65535) and back with rounding; float images are taken to be in [0, 1] already.
* `holdout_rows` splits a single image into a training part (top) and a validation part (bottom).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mednets.atomic import atomic_path
from mednets.data.volume import GZIP_MAX_RATIO, Volume, check_voxel_count
from mednets.errors import InvalidInputError

__all__ = [
    "first_level",
    "from_unit_range",
    "holdout_rows",
    "read_pillow",
    "read_tiff",
    "to_unit_range",
    "write_pillow",
    "write_tiff",
]

_INTEGER_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def read_tiff(path: Path, file_format: str) -> Volume:
    """Read level 0 of a TIFF or SVS file; several pages form a stack ``[N, H, W(, C)]``.

    Args:
        path: the file.
        file_format: its format name for ``meta["format"]``, e.g. ``"tif"``.

    Raises:
        InvalidInputError: the file cannot be read.
    """
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            # SVS and pyramidal TIFFs: level 0 is full resolution; several pages form a stack.
            level = series.levels[0]
            voxels = check_voxel_count(path, tuple(level.shape))
            if voxels > path.stat().st_size * GZIP_MAX_RATIO:  # no TIFF codec packs a pixel in under a bit
                raise InvalidInputError("the header claims more pixels than the file can hold (truncated or corrupt)",
                                        source=str(path), got=f"{level.shape} in {path.stat().st_size} bytes")  # fmt: skip
            array = level.asarray()
            has_channels = level.axes.endswith("S")  # tifffile's axis code for samples (RGB)
    except InvalidInputError:
        raise
    except Exception as error:
        raise InvalidInputError(f"cannot read image: {error}", source=str(path)) from error
    return _image_volume(array, has_channels, path, file_format)


def read_pillow(path: Path, file_format: str) -> Volume:
    """Read a PNG, JPEG (or any image Pillow opens): ``[H, W]`` or ``[H, W, C]``.

    Args:
        path: the file.
        file_format: its format name for ``meta["format"]``, e.g. ``"png"``.

    Raises:
        InvalidInputError: the file cannot be read.
    """
    try:
        from PIL import Image

        with Image.open(str(path)) as image:
            image.load()
            array = np.asarray(image)
            has_channels = image.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr")
    except Exception as error:
        raise InvalidInputError(f"cannot read image: {error}", source=str(path)) from error
    return _image_volume(array, has_channels, path, file_format)


def _image_volume(array: Any, has_channels: bool, path: Path, file_format: str) -> Volume:
    channel_axis = -1 if has_channels and array.ndim >= 3 else None
    return Volume(np.asarray(array), np.eye(4), channel_axis, {"source": str(path), "format": file_format})


def write_tiff(volume: Volume, path: Path) -> None:
    """Write the pixels as a TIFF (RGB when the channel axis holds 3 or 4 samples), atomically."""
    import tifffile

    array = np.asarray(volume.array)
    with atomic_path(path) as temporary:
        photometric = "rgb" if volume.channel_axis is not None and array.shape[-1] in (3, 4) else "minisblack"
        tifffile.imwrite(str(temporary), array, photometric=photometric)


def write_pillow(volume: Volume, path: Path, image_format: str) -> None:
    """Write one 2D image with Pillow, atomically.

    Args:
        volume: ``array`` ``[H, W]`` or ``[H, W, C]``.
        path: the file.
        image_format: Pillow's format name, ``"PNG"`` or ``"JPEG"`` (saved at quality 95).

    Raises:
        InvalidInputError: the array is not one 2D image.
    """
    from PIL import Image

    array = np.asarray(volume.array)
    with atomic_path(path) as temporary:
        if array.ndim not in (2, 3):
            raise InvalidInputError("a PNG/JPEG holds one 2D image", source=str(path), got=array.shape)
        Image.fromarray(array).save(str(temporary), format=image_format, quality=95)


def first_level(volume: Volume, source: str) -> Volume:
    """Level 0 of an image as read: ``array`` ``[H, W]`` or ``[H, W, C]`` (``channel_axis=-1``).

    Raises:
        InvalidInputError: what is left is not a 2D image.
    """
    array = volume.array
    pages = array.ndim - (2 if volume.channel_axis is None else 3)
    if array.size == 0 or array.ndim < 2:
        raise InvalidInputError("not a 2D image", source=source, got=volume.array.shape)
    if pages > 0:  # a stack of pages (or a pyramid's series): level 0 is the first
        array = array[(0,) * pages]
    return Volume(np.ascontiguousarray(array), volume.affine, -1 if array.ndim == 3 else None, dict(volume.meta))


def to_unit_range(array: np.ndarray, *, source: str = "image") -> np.ndarray:
    """Integer pixels scaled by their bit depth (uint8 /255, uint16 /65535), floats clipped, to float32 [0, 1]."""
    array = np.asarray(array)
    if array.dtype in _INTEGER_SCALES:
        return array.astype(np.float32) / np.float32(_INTEGER_SCALES[array.dtype])
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(array, 0.0, 1.0).astype(np.float32)
    raise InvalidInputError(
        "unsupported pixel type", source=source, expected="uint8, uint16 or float in [0, 1]", got=str(array.dtype)
    )


def from_unit_range(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of `to_unit_range`: float [0, 1] back to `dtype` (rounded for integer types)."""
    dtype = np.dtype(dtype)
    clipped = np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0)
    if dtype in _INTEGER_SCALES:
        return np.round(clipped * _INTEGER_SCALES[dtype]).astype(dtype)
    return clipped.astype(dtype)


def holdout_rows(height: int, fraction: float, multiple: int = 1) -> int:
    """Rows at the bottom of an image held out for validation: `fraction` of `height`, rounded to `multiple`.

    At least `multiple` rows are held out and at least `multiple` are left for training.

    Raises:
        InvalidInputError: the image is too small to be split this way.
    """
    if height < 2 * multiple:
        raise InvalidInputError(
            "image too small to hold out validation rows",
            source="image",
            expected=f">= {2 * multiple} rows",
            got=height,
        )
    rows = round(height * fraction / multiple) * multiple
    return int(min(max(rows, multiple), height - multiple))
