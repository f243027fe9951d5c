"""2D images as model input: level 0 of a file, channel-first, scaled by bit depth to [0, 1], and back.

Every 2D task (denoising, 2D segmentation) reads its images here, so training and inference see the
same pixels:

* `read_image_2d` returns level 0 of a file: the first page of a multi-page TIFF, the full-resolution
  level of an SVS pyramid, as ``[H, W]`` or ``[H, W, C]``. The whole level is read into memory.
* `to_unit_range` / `from_unit_range` map integer pixels to float [0, 1] by their bit depth (uint8:
  /255, uint16: /65535) and back with rounding; float images are taken to be in [0, 1] already.
* `holdout_rows` splits a single image into a training part (top) and a validation part (bottom).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mednets.data.io import IMAGE_SUFFIXES, Volume, read_image
from mednets.errors import InvalidInputError

__all__ = [
    "from_unit_range",
    "holdout_rows",
    "list_image_files",
    "read_image_2d",
    "to_unit_range",
]

_INTEGER_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def read_image_2d(path: str | os.PathLike[str]) -> Volume:
    """Read level 0 of a PNG, JPEG, TIFF or SVS file: ``array`` ``[H, W]`` or ``[H, W, C]`` (``channel_axis=-1``).

    Raises:
        InvalidInputError: unreadable file, or not an image.
    """
    volume = read_image(path)
    array = volume.array
    pages = array.ndim - (2 if volume.channel_axis is None else 3)
    if pages > 0:  # a stack of pages (or a pyramid's series): level 0 is the first
        array = array[(0,) * pages]
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise InvalidInputError("not a 2D image", source=str(path), got=volume.array.shape)
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


def list_image_files(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    """Image files among `paths`: files as given, folders expanded to their image files (sorted, not recursive).

    Raises:
        InvalidInputError: a path does not exist, or a folder holds no image file.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
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
