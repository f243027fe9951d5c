"""Reading every file of a dataset folder once, a few files at a time, and checking each on its own.

`check_files` reads every image and label map in full (in quick mode: the header of each volume file)
on a few threads, since decompression releases the GIL, and sums each file up in a `FileCheck`: the
geometry that `mednets.data.dataset` compares between files, and every problem the file has by itself.
Each problem is one line naming the file, what is wrong and what was expected:

* unreadable (corrupt, truncated, not the format its ending says), through the readers of `mednets.data.io`;
* empty (an axis of size zero), voxels that are not numbers, NaN or infinite voxels (with their count);
* label maps: non-integer values, values dataset.json does not declare;
* 2D images: several pages; 2D label maps: colour or several pages, a type other than integers.

Only one array per thread is in memory at a time; a `FileCheck` keeps no voxels.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mednets.data.io import IMAGE_SUFFIXES, read_geometry, read_volume
from mednets.data.volume import Volume
from mednets.errors import MednetsError

__all__ = ["FileCheck", "check_files"]

WORKERS = min(4, os.cpu_count() or 1)
_LISTED_VALUES = 10  # label values named in one problem line


@dataclass(frozen=True)
class FileCheck:
    """What validation learnt from one file.

    Attributes:
        path: the file.
        shape: spatial shape (``[D, H, W]``; 2D images ``[H, W]``, or ``[N, H, W]`` with N pages), colours
            left out; None when the file cannot be read.
        affine: 4x4 RAS+ affine (identity for 2D images); None when the file cannot be read.
        colours: colour channels of a 2D image (1 for grey images and for volumes).
        problems: one line per problem of the file by itself, each naming the file.
    """

    path: Path
    shape: tuple[int, ...] | None
    affine: np.ndarray | None
    colours: int = 1
    problems: tuple[str, ...] = field(default=())


def check_files(
    images: Sequence[Path],
    labels: Sequence[Path],
    *,
    label_ids: Collection[int],
    quick: bool = False,
    progress: bool = False,
) -> dict[Path, FileCheck]:
    """Read and check every file on `WORKERS` threads.

    Args:
        images: image files (every channel, training and test).
        labels: label maps; their values must be integers among `label_ids`.
        label_ids: the ids dataset.json declares.
        quick: read only the header of volume files (NIfTI, NRRD, MHA, MHD), so no voxel value is
            checked; 2D images, small and headerless, are read whole but their values not checked either.
        progress: show a progress bar.

    Returns:
        {path: FileCheck} for every file, in sorted path order whatever order the threads finish in.
    """
    from tqdm.auto import tqdm

    roles = {**{Path(p): False for p in images}, **{Path(p): True for p in labels}}
    paths = sorted(roles)
    ids = frozenset(int(i) for i in label_ids)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        checks = pool.map(lambda path: _check_file(path, roles[path], ids, quick), paths)
        return {check.path: check for check in tqdm(checks, total=len(paths), desc="checking files", unit="file",
                                                    disable=not progress)}  # fmt: skip


def _check_file(path: Path, is_label: bool, label_ids: frozenset[int], quick: bool) -> FileCheck:
    kind = "label" if is_label else "image"
    is_2d = path.name.lower().endswith(IMAGE_SUFFIXES)
    try:
        if quick and not is_2d:
            shape, affine = read_geometry(path)
            return FileCheck(path, shape, affine, problems=tuple(_empty_problem(path, kind, shape)))
        volume = read_volume(path)
    except (MednetsError, OSError) as error:  # the readers name the file themselves
        detail = str(error).removeprefix(f"{path}: ")
        return FileCheck(path, None, None, problems=(f"{path}: cannot read {kind} file ({detail})",))
    array = volume.array
    problems = _empty_problem(path, kind, volume.spatial_shape)
    if array.dtype.kind not in "biuf":
        problems.append(f"{path}: voxels of type {array.dtype} are not numbers (expected integers or floats)")
    if is_2d:
        problems += _image_problems(path, volume, is_label)
    if not quick and not problems:
        problems += _value_problems(path, array, label_ids if is_label else None)
    colours = 1 if volume.channel_axis is None else int(array.shape[volume.channel_axis])
    return FileCheck(path, volume.spatial_shape, volume.affine, colours, tuple(problems))


def _empty_problem(path: Path, kind: str, shape: tuple[int, ...]) -> list[str]:
    if all(shape):
        return []
    return [f"{path}: empty {kind}, shape {shape} (expected at least one voxel along every axis)"]


def _image_problems(path: Path, volume: Volume, is_label: bool) -> list[str]:
    """The rules of 2D datasets: one page per file; label maps single-channel and of integers."""
    array = volume.array
    if is_label and (array.ndim != 2 or volume.channel_axis is not None):
        return [f"{path}: a label map must be one single-channel 2D image, got shape {array.shape}"]
    if is_label and array.dtype.kind not in "biu":
        return [f"{path}: a label map must hold integers, got {array.dtype}"]
    if len(volume.spatial_shape) > 2:
        return [f"{path}: holds {array.shape[0]} pages; a 2D dataset holds one page per file"]
    return []


def _value_problems(path: Path, array: np.ndarray, label_ids: frozenset[int] | None) -> list[str]:
    """NaN and infinite voxels; for a label map (`label_ids` given), non-integer and undeclared values."""
    problems = []
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        nan, infinite = int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array)))
        counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (infinite, "infinite")) if n)
        problems.append(f"{path}: {counts} voxel(s) of {array.size} (expected finite values)")
    if label_ids is None:
        return problems
    values = np.unique(array)
    if array.dtype.kind == "f":
        values = values[np.isfinite(values)]
        whole = values == np.round(values)
        if not whole.all():
            problems.append(f"{path}: label values must be integers, got {_listing(values[~whole].tolist())}")
        values = values[whole]
    undeclared = [int(v) for v in values.tolist() if int(v) not in label_ids]
    if undeclared:
        problems.append(f"{path}: label values {_listing(undeclared)} are not declared in dataset.json labels")
    return problems


def _listing(values: list[int] | list[float]) -> str:
    """``[1, 2, 3]``, or the first few and how many more."""
    shown = f"[{', '.join(f'{v:g}' for v in values[:_LISTED_VALUES])}"
    return shown + (f", ... ({len(values)} values)]" if len(values) > _LISTED_VALUES else "]")
