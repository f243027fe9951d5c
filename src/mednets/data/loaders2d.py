"""Training and validation data of 2D segmentation: a 2D dataset folder -> patches and whole images.

Samples follow the batch convention of `mednets.tasks`: ``{"image": [C, H, W] float, "label": [H, W]
int64, "case": str}``. Images are read and normalised once (`normalise_2d`) and kept in memory.
Training patches are drawn from (seed, epoch, index), so a resumed run sees the same samples; half
of them are centred on a foreground pixel, so small structures are seen often.

Validation: with two or more training cases, a seeded share of the cases (`split_cases`); with a
single case (one large image), the bottom `val_fraction` of its rows.

Flips: anatomy (labels named after organs of `mednets.anatomy`) allows the left-right flip only, and
only without left/right twin classes (`allowed_flip_axes`); other structures (cells, nuclei) have no
orientation, so both flips and 90-degree turns are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mednets import anatomy
from mednets.data.dataset import Dataset as DatasetFolder
from mednets.data.dataset import split_cases
from mednets.data.dataset2d import read_case_2d
from mednets.data.images2d import holdout_rows
from mednets.data.transforms import allowed_flip_axes
from mednets.errors import DatasetError

__all__ = ["SegmentationImages2D", "SegmentationPatches2D", "augmentation_axes_2d", "segmentation_datasets_2d"]


def augmentation_axes_2d(structures: Sequence[str]) -> tuple[list[int], bool]:
    """Flippable axes of ``[H, W]`` and whether 90-degree turns are allowed, for these structure names."""
    organs = set(anatomy.organ_names())
    if any(name in organs for name in structures):
        return allowed_flip_axes(list(structures), spatial_dims=2), False
    return [0, 1], True


class SegmentationPatches2D(Dataset):
    """Random training patches of in-memory images, half of them centred on foreground.

    Args:
        images: normalised images ``[C, H, W]``.
        labels: label maps ``[H, W]``.
        patch_size: ``(h, w)``; images smaller than a patch are padded (image 0, label 0).
        flip_axes: axes of ``[H, W]`` flipped with probability 1/2 each.
        rotate: random 90-degree turns (square patches only).
        seed: base seed.
        epoch_size: samples per epoch (at least one per image).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        patch_size: Sequence[int],
        *,
        flip_axes: Sequence[int] = (),
        rotate: bool = False,
        seed: int = 0,
        epoch_size: int = 64,
    ) -> None:
        self.patch = tuple(int(s) for s in patch_size)
        self.images, self.labels = [], []
        for image, label in zip(images, labels, strict=True):
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch, label.shape, strict=True)]
            self.images.append(np.pad(image, [(0, 0), *pad]))
            self.labels.append(np.pad(label, pad))
        self.foreground = [np.argwhere(label > 0) for label in self.labels]
        self.flip_axes, self.rotate = list(flip_axes), rotate and self.patch[0] == self.patch[1]
        self.seed, self.epoch, self.epoch_size = seed, 0, max(epoch_size, len(self.images))

    def set_epoch(self, epoch: int) -> None:
        """Make the next samples depend on `epoch` (called by the trainer before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.epoch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        which = index % len(self.images)
        image, label, foreground = self.images[which], self.labels[which], self.foreground[which]
        limits = np.asarray(label.shape) - np.asarray(self.patch)
        if len(foreground) and rng.random() < 0.5:
            centre = foreground[int(rng.integers(len(foreground)))]
            corner = np.clip(centre - np.asarray(self.patch) // 2 + rng.integers(-8, 9, 2), 0, limits)
        else:
            corner = np.array([rng.integers(0, limit + 1) for limit in limits])
        window = tuple(slice(int(c), int(c) + p) for c, p in zip(corner, self.patch, strict=True))
        image_patch, label_patch = image[(slice(None), *window)], label[window]
        for axis in self.flip_axes:
            if rng.random() < 0.5:
                image_patch, label_patch = np.flip(image_patch, axis + 1), np.flip(label_patch, axis)
        if self.rotate:
            turns = int(rng.integers(4))
            image_patch, label_patch = np.rot90(image_patch, turns, (1, 2)), np.rot90(label_patch, turns)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image_patch)),
            "label": torch.from_numpy(np.ascontiguousarray(label_patch)),
        }


class SegmentationImages2D(Dataset):
    """Whole validation images: ``{"image": [C, H, W], "label": [H, W], "case": id}``."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], cases: Sequence[str]) -> None:
        self.samples = [
            {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "case": case}
            for image, label, case in zip(images, labels, cases, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, object]:
        return self.samples[index]


def segmentation_datasets_2d(
    dataset: DatasetFolder,
    *,
    patch_size: Sequence[int],
    hu_window: Sequence[float],
    val_fraction: float,
    split_seed: int,
    augment: bool,
    seed: int,
) -> tuple[SegmentationPatches2D, SegmentationImages2D]:
    """Training patches and whole validation images of a validated 2D dataset folder (module docstring)."""
    cases = {case.case_id: read_case_2d(dataset, case, hu_window) for case in dataset.training}
    if not cases:
        raise DatasetError("no training case", source=str(dataset.root))
    if len(cases) >= 2:
        train_ids, val_ids = split_cases(list(cases), val_fraction=val_fraction, seed=split_seed)
        train = [cases[c] for c in train_ids]
        val = [(*cases[c], c) for c in val_ids]
    else:
        ((case_id, (image, label)),) = cases.items()
        rows = holdout_rows(label.shape[0], val_fraction, 16)
        train = [(image[:, :-rows], label[:-rows])]
        val = [(image[:, -rows:], label[-rows:], f"{case_id}_bottom")]
    flip_axes, rotate = augmentation_axes_2d(dataset.structures) if augment else ([], False)
    patches = SegmentationPatches2D(
        [image for image, _ in train], [label for _, label in train], patch_size, flip_axes=flip_axes, rotate=rotate,
        seed=seed,
    )  # fmt: skip
    return patches, SegmentationImages2D([v[0] for v in val], [v[1] for v in val], [v[2] for v in val])
