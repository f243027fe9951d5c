"""Training and validation sets of segmentation, 2D and 3D, from the preprocessed cache; the label atlas.

Validation: a seeded share of the cases (`split_cases`); a dataset of a single 2D image validates on
its bottom `val_fraction` of rows and trains on the rest. Training samples are seeded patches (or the
whole-image grid), validation samples whole cases (`mednets.data.streaming`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from mednets.data.dataset import Dataset as DatasetFolder
from mednets.data.dataset import split_cases
from mednets.data.images import holdout_rows
from mednets.data.intensity import padding_value
from mednets.data.preprocessing import PreprocessedCache, PreprocessingPlan
from mednets.data.streaming import CachedCaseDataset, mean_centroids
from mednets.data.transforms import RandOrganRemovald, augmentation, augmentation_axes
from mednets.errors import ConfigError, DatasetError

__all__ = ["MIN_EPOCH_SAMPLES", "LabelAtlas", "label_atlas", "segmentation_datasets"]

# An epoch repeats the cases until it has at least this many samples, so tiny datasets (one image)
# still fill batches and every case is seen equally often.
MIN_EPOCH_SAMPLES = 64


def _split(
    dataset: DatasetFolder, cache: PreprocessedCache, cases: list[str], val_fraction: float, split_seed: int
) -> tuple[list[str], list[str], dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Training and validation case ids, and the rows each keeps (a single 2D image is split by rows)."""
    if not cases:
        raise DatasetError("no training case", source=str(dataset.root), expected="labelled cases in imagesTr")
    if len(cases) >= 2 or dataset.spatial_dims == 3:
        train, val = split_cases(cases, val_fraction=val_fraction, seed=split_seed)
        return train, val, {}, {}
    (case,) = cases
    height = cache.properties(case)["preprocessed_shape"][0]
    rows = holdout_rows(height, val_fraction, 16)
    return [case], [case], {case: (0, height - rows)}, {case: (height - rows, height)}


def segmentation_datasets(
    dataset: DatasetFolder,
    cache: PreprocessedCache,
    plan: PreprocessingPlan,
    *,
    cases: Sequence[str],
    grid: Sequence[int] | None,
    patch_size: Sequence[int] | None,
    val_fraction: float,
    split_seed: int,
    augment: bool,
    seed: int,
    augmentation_strength: str = "nnunet",
    foreground_share: float = 0.33,
    absent_share: float = 0.3,
    organ_removal: Sequence[str] = (),
    organ_removal_prob: float = 0.0,
) -> tuple[CachedCaseDataset, CachedCaseDataset]:
    """Training and validation sets of a preprocessed dataset folder (2D or 3D) for a segmenter.

    Args:
        dataset: the validated dataset folder.
        cache: its preprocessed cases.
        plan: the plan they were preprocessed with (the padding value of each channel).
        cases: the cases to use (those preprocessing did not skip).
        grid: whole-image model grid (SADAAn), or None.
        patch_size: training patch size (patch-wise models), or None. Validation uses whole cases.
        val_fraction: share of cases (or rows of a single image) for validation.
        split_seed: seed of the split.
        augment: random augmentation for training.
        augmentation_strength: "nnunet" or "light" (`mednets.data.transforms.augmentation`).
        seed: base seed of the random choices.
        foreground_share, absent_share: where training patches are centred (`mednets.data.streaming`).
        organ_removal: structure names a training case may lose (`RandOrganRemovald`); `["*"]`: any.
        organ_removal_prob: probability that a training case loses one of them.

    Raises:
        ConfigError: a name in `organ_removal` is not one of the dataset's structures.
        DatasetError: no training case.
    """
    if tuple(organ_removal) == ("*",):  # every structure: a config that knows no dataset's names
        organ_removal = dataset.structures
    unknown = sorted(set(organ_removal) - set(dataset.structures)) if organ_removal_prob > 0 else []
    if unknown:
        raise ConfigError("unknown structure to remove", source="data.organ_removal", got=unknown,
                          expected=f"names from {dataset.structures}")  # fmt: skip
    train, val, train_rows, val_rows = _split(dataset, cache, list(cases), val_fraction, split_seed)
    pads = [padding_value(rule) for rule in plan.normalisation]
    removal = None
    if augment and organ_removal_prob > 0 and organ_removal:
        removal = RandOrganRemovald("image", "label", [dataset.labels[n] for n in organ_removal], organ_removal_prob)
    transform = None
    if augment:
        flips, quarter_turns = augmentation_axes(dataset.structures, dataset.spatial_dims)
        transform = augmentation(flip_axes=flips, quarter_turns=quarter_turns, spatial_dims=dataset.spatial_dims,
                                 strength=augmentation_strength)  # fmt: skip
    train_set = CachedCaseDataset(
        str(cache.root), train, pad_values=pads, patch_size=patch_size, grid=grid, seed=seed,
        repeat=math.ceil(MIN_EPOCH_SAMPLES / len(train)), foreground_share=foreground_share,
        absent_share=absent_share, prior=mean_centroids(cache, train) if patch_size else None, augment=transform,
        removal=removal, rows=train_rows,
    )  # fmt: skip
    val_set = CachedCaseDataset(str(cache.root), val, pad_values=pads, grid=grid, seed=seed, rows=val_rows)
    return train_set, val_set


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


def label_atlas(cases: CachedCaseDataset, num_classes: int, *, smoothing_voxels: float = 1.0) -> LabelAtlas:
    """Voxel-wise frequency and smallest extent of each structure over cases on a whole-image grid.

    The label maps are those training sees (the cached cases padded or cropped to the grid), so the
    atlas lies exactly where the model sees the organs; the frequency is then lightly smoothed so a
    structure's neighbourhood is not ruled out.

    Args:
        cases: whole-image samples without augmentation (`CachedCaseDataset` with a grid).
        num_classes: classes including background.
        smoothing_voxels: gaussian sigma of the frequency's smoothing, in grid voxels (0: none).

    Returns:
        The atlas, `K = num_classes - 1` structures in label order.
    """
    if cases.grid is None or cases.augment is not None or cases.removal is not None:
        raise ConfigError("the label atlas needs unaugmented whole-image samples", source="label_atlas")
    counts = np.zeros((num_classes - 1, *cases.grid), dtype=np.float64)
    smallest = np.full(num_classes - 1, np.inf)
    for index in range(len(cases.cases)):
        labels = cases[index]["label"].numpy()
        for structure in range(num_classes - 1):
            inside = labels == structure + 1
            counts[structure] += inside
            voxels = int(inside.sum())
            if voxels:
                smallest[structure] = min(smallest[structure], voxels)
    frequency = counts / max(len(cases.cases), 1)
    if smoothing_voxels > 0:
        frequency = np.stack([ndimage.gaussian_filter(f, smoothing_voxels) for f in frequency])
    smallest_share = np.where(np.isfinite(smallest), smallest, 0.0) / float(np.prod(cases.grid))
    return LabelAtlas(
        torch.from_numpy(frequency.astype(np.float32)), torch.from_numpy(smallest_share.astype(np.float32))
    )
