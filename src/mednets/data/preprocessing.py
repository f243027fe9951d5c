"""Preprocessing once, to a disk cache: crop, reorient, normalise and resample every case, in worker processes.

A cache folder holds one subfolder per case, written whole or not at all (a temporary folder renamed
into place)::

    <cache>/plan.json                  the `PreprocessingPlan` it was made with (its hash names <cache>)
    <cache>/cases/<case>/image.npy     float32 [C, *S], normalised, at the plan's voxel size
    <cache>/cases/<case>/label.npy     uint8 [*S]
    <cache>/cases/<case>/locations.npy int32 [N, 1 + dims]: (class, voxel index) samples for oversampling
    <cache>/cases/<case>/properties.json  original geometry, crop box, presence, centroids, file sizes

`.npy` files are memory-mapped by training (`open_case`), so memory does not grow with the dataset.
A run interrupted part-way resumes: finished cases are kept, half-written ones were never renamed into
place. A changed plan gets another folder. A case whose files do not match its properties (truncated,
edited) is a typed error naming it, never data read silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mednets.atomic import atomic_write_text
from mednets.data.cropping import body_box
from mednets.data.dataset import Case, Dataset
from mednets.data.fingerprint import Fingerprint
from mednets.data.intensity import ChannelNormalisation, normalise
from mednets.data.parallel import default_workers, map_cases
from mednets.data.volume import Volume, max_voxels
from mednets.errors import DatasetError, InvalidInputError
from mednets.host_memory import total_memory_bytes

__all__ = [
    "CachedCase",
    "PreprocessedCache",
    "PreprocessingPlan",
    "case_memory_bytes",
    "preprocess_arrays",
    "preprocess_dataset",
]

log = logging.getLogger(__name__)

PREPROCESSING_VERSION = 1  # part of every cache key: a change of this module's output starts new caches
LOCATIONS_PER_CLASS = 2000  # voxel samples per class kept for foreground oversampling


@dataclass(frozen=True)
class PreprocessingPlan:
    """What preprocessing does to every case (the data part of a run's plan).

    Attributes:
        spatial_dims: 2 or 3.
        spacing: target voxel size in mm per array axis, or None to keep each case's.
        orientation: axis codes every 3D case is reoriented to, or None.
        normalisation: one rule per array channel.
        crop: crop each case to its body box (`mednets.data.cropping`).
    """

    spatial_dims: int
    spacing: tuple[float, ...] | None
    orientation: str | None
    normalisation: tuple[ChannelNormalisation, ...]
    crop: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims, "spacing": list(self.spacing) if self.spacing else None,
                "orientation": self.orientation, "normalisation": [rule.to_dict() for rule in self.normalisation],
                "crop": self.crop}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingPlan:
        spacing = data.get("spacing")
        return cls(int(data["spatial_dims"]), tuple(float(s) for s in spacing) if spacing else None,
                   data.get("orientation"), tuple(ChannelNormalisation.from_dict(r) for r in data["normalisation"]),
                   bool(data.get("crop", True)))  # fmt: skip

    def key(self) -> str:
        """A short hash of everything that changes the cached arrays."""
        text = json.dumps({"plan": self.to_dict(), "version": PREPROCESSING_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> list[int]:
    if target is None:
        return list(shape)
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]


def case_memory_bytes(shape: Sequence[int], spacing: Sequence[float], channels: int, plan: PreprocessingPlan) -> int:
    """Peak memory of preprocessing one case, estimated: the stored arrays, float copies and the resampled ones."""
    voxels_in = int(np.prod(shape))
    voxels_out = int(np.prod(_target_shape(shape, spacing, plan.spacing)))
    return voxels_in * (channels * 10 + 6) + voxels_out * (channels * 8 + 5)


def _resampled(image: torch.Tensor, labels: torch.Tensor | None, size: list[int]) -> tuple[torch.Tensor, Any]:
    """`[C, *S]` float linearly and `[*S]` labels by nearest neighbour, to `size`."""
    if list(image.shape[1:]) == size:
        return image, labels
    mode = "trilinear" if len(size) == 3 else "bilinear"
    image = F.interpolate(image[None], size=size, mode=mode, align_corners=False)[0]
    if labels is not None:
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(torch.uint8)
    return image, labels


def preprocess_arrays(
    channels: Sequence[np.ndarray],
    labels: np.ndarray | None,
    spacing: Sequence[float],
    plan: PreprocessingPlan,
    *,
    source: str = "image",
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[tuple[int, int], ...]]:
    """Crop, normalise and resample one case already in the plan's orientation.

    Args:
        channels: `[*S]` per channel, as stored.
        labels: `[*S]` label map, or None (prediction).
        spacing: the case's voxel size per array axis.
        plan: the plan.
        source: the image's name in errors.

    Returns:
        image `[C, *S']` float32, labels `[*S']` uint8 (or None), and the crop box in input voxels.

    Raises:
        InvalidInputError: at the plan's voxel size the image would exceed `max_voxels` (a wrong voxel
            size in its header), checked before anything is allocated.
    """
    schemes = [rule.scheme for rule in plan.normalisation]
    shape = channels[0].shape
    box = body_box(channels, schemes, labels) if plan.crop else tuple((0, n) for n in shape)
    size = _target_shape([stop - start for start, stop in box], spacing, plan.spacing)
    if math.prod(size) > max_voxels():
        raise InvalidInputError(f"at the voxel size of {list(plan.spacing or [])} mm this image would have "
                                f"{math.prod(size)} voxels; is the voxel size in its header right?", source=source,
                                expected=f"at most {max_voxels()} voxels (MEDNETS_MAX_VOXELS)",
                                got=f"voxel size {[round(s, 4) for s in spacing]} mm")  # fmt: skip
    window = tuple(slice(start, stop) for start, stop in box)
    image = torch.stack([torch.as_tensor(normalise(np.asarray(channel[window]), rule))
                         for channel, rule in zip(channels, plan.normalisation, strict=True)])  # fmt: skip
    cropped_labels = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels[window], dtype=np.uint8))
    image, cropped_labels = _resampled(image, cropped_labels, size)
    return image.contiguous(), cropped_labels, box


def _class_locations(labels: np.ndarray, label_ids: Sequence[int], seed: str) -> tuple[np.ndarray, dict]:
    """Up to `LOCATIONS_PER_CLASS` voxel indices per class (seeded by the case), and each class's centroid."""
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    rows, centroids = [], {}
    flat = labels.reshape(-1)
    for label_id in label_ids:
        where = np.flatnonzero(flat == label_id)
        if not where.size:
            continue
        coords = np.stack(np.unravel_index(where, labels.shape), axis=1)
        centroids[str(label_id)] = [float(v) for v in (coords.mean(axis=0) + 0.5) / np.asarray(labels.shape)]
        chosen = coords[rng.choice(where.size, min(LOCATIONS_PER_CLASS, where.size), replace=False)]
        rows.append(np.concatenate([np.full((len(chosen), 1), label_id), chosen], axis=1))
    width = 1 + labels.ndim
    return (np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, width), np.int32)), centroids


@dataclass
class CachedCase:
    """One preprocessed case, memory-mapped: image `[C, *S]` float32, labels `[*S]` uint8, locations `[N, 1+dims]`."""

    case: str
    image: np.ndarray
    labels: np.ndarray
    locations: np.ndarray
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def presence(self) -> list[bool]:
        return [bool(v) for v in self.properties["presence"]]


class PreprocessedCache:
    """The cache folder of one dataset and one `PreprocessingPlan` (module docstring)."""

    FILES = ("image.npy", "label.npy", "locations.npy")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def cases_dir(self) -> Path:
        return self.root / "cases"

    def case_dir(self, case: str) -> Path:
        return self.cases_dir / case

    def properties(self, case: str) -> dict[str, Any]:
        """The case's properties.

        Raises:
            DatasetError: the case is not in the cache, or its properties cannot be read.
        """
        path = self.case_dir(case) / "properties.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DatasetError(f"preprocessed case is missing or unreadable ({error})", source=str(path),
                               expected="a case written by preprocessing; delete the folder to preprocess again") from error  # fmt: skip

    def is_complete(self, case: str) -> bool:
        """Whether the case is in the cache with files that match its properties (checked by size and header)."""
        try:
            self.open_case(case)
        except DatasetError:
            return False
        return True

    def open_case(self, case: str) -> CachedCase:
        """The case's arrays, memory-mapped (nothing is read until used).

        Raises:
            DatasetError: a file is missing, of another size than when written, or not the shape recorded.
        """
        properties = self.properties(case)
        arrays = []
        for name in self.FILES:
            path = self.case_dir(case) / name
            expected = properties.get("files", {}).get(name)
            try:
                size = path.stat().st_size
                if expected is None or size != expected["bytes"]:
                    raise ValueError(f"{size} bytes where {expected and expected['bytes']} were written")
                array = np.load(path, mmap_mode="r")
                if list(array.shape) != expected["shape"]:
                    raise ValueError(f"shape {list(array.shape)} where {expected['shape']} was written")
            except (OSError, ValueError) as error:
                raise DatasetError(f"preprocessed case is corrupt ({error})", source=str(path),
                                   expected="delete the case's folder (or the cache) to preprocess it again") from error  # fmt: skip
            arrays.append(array)
        return CachedCase(case, arrays[0], arrays[1], arrays[2], properties)

    def write_case(self, case: str, image: np.ndarray, labels: np.ndarray, locations: np.ndarray,
                   properties: dict[str, Any]) -> None:  # fmt: skip
        """Write a case's files into a temporary folder, then rename it into place (all or nothing)."""
        self.cases_dir.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{case}.", suffix=".tmp", dir=self.cases_dir))
        try:
            files = {}
            for name, array in zip(self.FILES, (image, labels, locations), strict=True):
                np.save(temporary / name, np.ascontiguousarray(array))
                files[name] = {"bytes": (temporary / name).stat().st_size, "shape": list(array.shape)}
            (temporary / "properties.json").write_text(json.dumps({**properties, "files": files}, indent=1))
            target = self.case_dir(case)
            if target.exists():  # an earlier, corrupt copy: moved aside first, so the rename below is atomic
                stale = Path(tempfile.mkdtemp(prefix=f".{case}.", suffix=".stale", dir=self.cases_dir))
                os.replace(target, stale / case)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(temporary, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Remove temporary folders of an interrupted run (never read: they were not renamed into place)."""
        if self.cases_dir.is_dir():
            for path in self.cases_dir.glob(".*.tmp"):
                shutil.rmtree(path, ignore_errors=True)


def _read_oriented(case: Case, orientation: str | None) -> tuple[list[np.ndarray], np.ndarray | None, Volume]:
    """The case's channels and labels in `orientation` (3D), and its first channel's volume as read."""
    from mednets.data.fingerprint import read_case_arrays

    channels, labels, volume = read_case_arrays(case)
    if orientation is None or len(volume.spatial_shape) != 3 or volume.orientation == orientation:
        return channels, labels, volume
    first = Volume(channels[0], volume.affine).reoriented(orientation)
    turned = [first.array] + [Volume(channel, volume.affine).reoriented(orientation).array for channel in channels[1:]]
    turned_labels = None if labels is None else Volume(labels, volume.affine).reoriented(orientation).array
    return turned, turned_labels, first


def _preprocess_case(job: tuple[Dataset, Case, PreprocessingPlan, str]) -> str:
    """Preprocess one case into the cache (runs in a worker process); returns its id."""
    dataset, case, plan, root = job
    channels, labels, volume = _read_oriented(case, plan.orientation)
    assert labels is not None  # training cases have labels (validated on load)
    spacing = volume.spacing if plan.spatial_dims == 3 else (1.0,) * plan.spatial_dims
    image, label_tensor, box = preprocess_arrays(channels, labels, spacing, plan)
    label_array = label_tensor.numpy()
    ids = [dataset.labels[name] for name in dataset.structures]
    locations, centroids = _class_locations(label_array, ids, case.case_id)
    present = dataset.presence(case.case_id, labels)
    properties = {
        "case": case.case_id, "shape": list(labels.shape), "spacing": [float(s) for s in spacing],
        "orientation": plan.orientation, "affine": np.asarray(volume.affine).tolist(), "box": [list(b) for b in box],
        "preprocessed_shape": list(label_array.shape), "presence": [bool(present[name]) for name in dataset.structures],
        "centroids": centroids,
    }  # fmt: skip
    PreprocessedCache(root).write_case(case.case_id, image.numpy(), label_array, locations, properties)
    return case.case_id


def _memory_limit(workers: int) -> int:
    """Bytes one worker may use: half of this machine's memory shared by the workers."""
    return int(total_memory_bytes() * 0.5 / max(1, workers))


def preprocess_dataset(
    dataset: Dataset,
    fingerprint: Fingerprint,
    plan: PreprocessingPlan,
    folder: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    memory_limit_bytes: int | None = None,
) -> tuple[PreprocessedCache, dict[str, str]]:
    """Preprocess every training case not yet cached (or cached corrupt) into `folder`, in worker processes.

    A case too large to preprocess within `memory_limit_bytes` (default: half the machine's memory
    shared by the workers), or one that fails, is skipped with a logged warning; the others go on.

    Returns:
        The cache and {case: why it was skipped}.
    """
    cache = PreprocessedCache(folder)
    cache.root.mkdir(parents=True, exist_ok=True)
    saved_plan = cache.root / "plan.json"
    if not saved_plan.is_file():
        atomic_write_text(saved_plan, json.dumps(plan.to_dict(), indent=1))
    cache.remove_leftovers()
    todo = [case for case in dataset.training if not cache.is_complete(case.case_id)]
    workers = default_workers(len(todo)) if workers is None else workers
    limit = memory_limit_bytes or _memory_limit(workers)
    by_id = {entry.case: entry for entry in fingerprint.cases}
    skipped: dict[str, str] = {}
    jobs = []
    for case in todo:
        entry = by_id[case.case_id]
        need = case_memory_bytes(entry.shape, entry.spacing, len(entry.intensity), plan)
        if need > limit:
            skipped[case.case_id] = (f"needs about {need / 2**30:.1f} GiB to preprocess, more than the "
                                     f"{limit / 2**30:.1f} GiB allowed per worker")  # fmt: skip
        else:
            jobs.append((dataset, case, plan, str(cache.root)))
    for (_, case, _, _), _, error in map_cases(_preprocess_case, jobs, workers=workers, desc="preprocessing",
                                               progress=progress):  # fmt: skip
        if error is not None:
            skipped[case.case_id] = f"failed: {error}"
    for case, reason in skipped.items():
        log.warning("case %s skipped: %s", case, reason)
    return cache, skipped
