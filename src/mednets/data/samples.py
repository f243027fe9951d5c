"""Training and validation samples of segmentation, 2D and 3D: dataset folder -> MONAI pipeline -> sample dicts.

Samples are `{"image": [C, *S] float, "label": [*S] int64, "presence": [K] bool, "case": str}` (the
batch convention of `mednets.tasks`). The deterministic part of the pipeline (load, normalise,
resample, resize to the grid) is cached in memory once; the random part (patch sampling, organ
removal, augmentation) is seeded per (seed, epoch, index), so an epoch's samples depend on nothing
else and a resumed run sees exactly the samples the uninterrupted run would have seen. The dimension
comes from the dataset's files (`spatial_dims`).

Validation: a seeded share of the cases (`split_cases`); a dataset of a single 2D image validates on
its bottom `val_fraction` of rows and trains on the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from scipy import ndimage

from mednets.data.dataset import Dataset as DatasetFolder
from mednets.data.dataset import read_label_map, split_cases
from mednets.data.images import holdout_rows
from mednets.data.transforms import location_prior, segmentation_pipeline
from mednets.errors import ConfigError, DatasetError

__all__ = ["MIN_EPOCH_SAMPLES", "LabelAtlas", "SeededDataset", "label_atlas", "segmentation_datasets"]

# An epoch repeats the cases until it has at least this many samples, so tiny datasets (one image)
# still fill batches and every case is seen equally often.
MIN_EPOCH_SAMPLES = 64


def _to_sample(item: Any) -> dict[str, Any]:
    """The batch convention of `mednets.tasks` from a MONAI record (or a one-patch list of records)."""
    if isinstance(item, list):
        item = item[0]
    image = torch.as_tensor(item["image"]).as_subclass(torch.Tensor).float()
    sample: dict[str, Any] = {"image": image, "case": item["case"]}
    if "label" in item:
        sample["label"] = torch.as_tensor(item["label"]).as_subclass(torch.Tensor)[0].round().long()
    if "presence" in item:
        sample["presence"] = torch.as_tensor(np.asarray(item["presence"]) > 0.5)
    return sample


class SeededDataset(CacheDataset):
    """The one sampler: a MONAI `CacheDataset` whose random transforms are seeded by (seed, epoch, index).

    Args:
        records: MONAI records (`Dataset.records()`).
        transform: the pipeline; everything before its first random transform is cached.
        seed: base seed of the random transforms.
        repeat: each epoch visits every record this many times (training), else once (validation).
    """

    def __init__(self, records: Sequence[dict[str, Any]], transform: Any, seed: int = 0, *, repeat: int = 1) -> None:
        super().__init__(list(records), transform, progress=False)
        self.seed, self.epoch, self.repeat = seed, 0, max(1, repeat)

    def set_epoch(self, epoch: int) -> None:
        """Make the next samples depend on `epoch` (called by the trainer before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return super().__len__() * self.repeat

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")  # also ends plain iteration
        sample_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**31)
        self.transform.set_random_state(seed=sample_seed)
        return _to_sample(super().__getitem__(index % super().__len__()))


def _split_records(dataset: DatasetFolder, val_fraction: float, split_seed: int) -> tuple[list[dict], list[dict]]:
    """Training and validation records: a seeded split of the cases, or the rows of a single 2D image."""
    if not dataset.training:
        raise DatasetError("no training case", source=str(dataset.root), expected="labelled cases in imagesTr")
    if len(dataset.training) >= 2 or dataset.spatial_dims == 3:
        train_ids, val_ids = split_cases([c.case_id for c in dataset.training], val_fraction=val_fraction,
                                         seed=split_seed)  # fmt: skip
        return dataset.records(train_ids), dataset.records(val_ids)
    (record,) = dataset.records()
    height = read_label_map(record["label"]).shape[0]
    rows = holdout_rows(height, val_fraction, 16)
    train = {**record, "rows": (0, height - rows)}
    val = {**record, "rows": (height - rows, height), "case": f"{record['case']}_bottom"}
    return [train], [val]


def segmentation_datasets(
    dataset: DatasetFolder,
    *,
    grid: Sequence[int] | None,
    patch_size: Sequence[int] | None,
    hu_window: Sequence[float],
    spacing_mm: Sequence[float] | None,
    val_fraction: float,
    split_seed: int,
    augment: bool,
    seed: int,
    organ_removal: Sequence[str] = (),
    organ_removal_prob: float = 0.0,
) -> tuple[SeededDataset, SeededDataset]:
    """Training and validation datasets of a dataset folder (2D or 3D) for a segmenter.

    Args:
        dataset: a validated dataset folder.
        grid: whole-image model grid (SADAAn), or None.
        patch_size: training patch size (patch-wise models), or None. Validation always uses whole
            images (resized to `grid` when given).
        hu_window: the CT window (`mednets.data.intensity`).
        spacing_mm: resample to this spacing first.
        val_fraction: share of cases (or rows of a single image) for validation.
        split_seed: seed of the split.
        augment: random augmentation for training.
        seed: base seed of the random transforms.
        organ_removal: structure names a training case may lose (`RandOrganRemovald`).
        organ_removal_prob: probability that a training case loses one of them.

    Raises:
        ConfigError: a name in `organ_removal` is not one of the dataset's structures.
        DatasetError: no training case.
    """
    unknown = sorted(set(organ_removal) - set(dataset.structures)) if organ_removal_prob > 0 else []
    if unknown:
        raise ConfigError("unknown structure to remove", source="data.organ_removal", got=unknown,
                          expected=f"names from {dataset.structures}")  # fmt: skip
    train_records, val_records = _split_records(dataset, val_fraction, split_seed)
    prior = None
    if patch_size is not None:
        prior = location_prior([read_label_map(r["label"], r.get("rows")) for r in train_records], dataset.labels)
    common = dict(channel_names=dataset.channel_names, hu_window=hu_window, spacing_mm=spacing_mm, grid=grid,
                  num_classes=len(dataset.labels), label_names=dataset.structures,
                  spatial_dims=dataset.spatial_dims)  # fmt: skip
    removable = [dataset.labels[name] for name in organ_removal] if organ_removal_prob > 0 else []
    train_pipeline = segmentation_pipeline(**common, patch_size=patch_size, prior=prior, augment=augment,
                                           remove_organ_ids=removable, remove_organ_prob=organ_removal_prob)  # fmt: skip
    val_pipeline = segmentation_pipeline(**common, augment=False)
    repeat = math.ceil(MIN_EPOCH_SAMPLES / len(train_records))
    return (
        SeededDataset(train_records, train_pipeline, seed, repeat=repeat),
        SeededDataset(val_records, val_pipeline, seed),
    )


@dataclass(frozen=True)
class LabelAtlas:
    """What the training labels say about each structure on a model's grid.

    Attributes:
        frequency: `[K, *grid]` float32, the share of cases with structure `k` at each voxel.
        smallest_share: `[K]` float32, the smallest share of the grid structure `k` fills in a case
            where it has voxels (0 where no case has it): the smallest real organ, e.g. a kidney cut by
            the field of view.
    """

    frequency: torch.Tensor
    smallest_share: torch.Tensor


def label_atlas(
    dataset: SeededDataset,
    num_classes: int,
    *,
    grid: Sequence[int],
    channel_names: Sequence[str],
    hu_window: Sequence[float],
    spacing_mm: Sequence[float] | None,
    smoothing_voxels: float = 1.0,
) -> LabelAtlas:
    """Voxel-wise frequency and smallest extent of each structure over a dataset's cases, on a model's grid.

    Each label map goes through the same deterministic pipeline as training (load, optional
    resampling, nearest-neighbour resize to `grid`), so the atlas lies exactly where the model sees
    the organs; the frequency is then lightly smoothed so a structure's neighbourhood is not ruled out.

    Args:
        dataset: the training set (its records are read again, without augmentation).
        num_classes: classes including background.
        grid: the model's grid.
        channel_names, hu_window, spacing_mm: as in training.
        smoothing_voxels: gaussian sigma of the frequency's smoothing, in grid voxels (0: none).

    Returns:
        The atlas, `K = num_classes - 1` structures in label order.
    """
    pipeline = segmentation_pipeline(channel_names=channel_names, hu_window=hu_window, spacing_mm=spacing_mm,
                                     grid=grid, num_classes=num_classes, augment=False, spatial_dims=len(grid))  # fmt: skip
    counts = np.zeros((num_classes - 1, *grid), dtype=np.float64)
    smallest = np.full(num_classes - 1, np.inf)
    for record in dataset.data:
        labels = np.asarray(pipeline(dict(record))["label"])[0].round()
        for structure in range(num_classes - 1):
            inside = labels == structure + 1
            counts[structure] += inside
            voxels = int(inside.sum())
            if voxels:
                smallest[structure] = min(smallest[structure], voxels)
    frequency = counts / max(len(dataset.data), 1)
    if smoothing_voxels > 0:
        frequency = np.stack([ndimage.gaussian_filter(f, smoothing_voxels) for f in frequency])
    smallest_share = np.where(np.isfinite(smallest), smallest, 0.0) / float(np.prod(grid))
    return LabelAtlas(
        torch.from_numpy(frequency.astype(np.float32)), torch.from_numpy(smallest_share.astype(np.float32))
    )
