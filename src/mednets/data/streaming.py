"""Training and validation samples read from the preprocessed cache: patches streamed, never the dataset in RAM.

Each sample opens its case's memory-mapped arrays (`PreprocessedCache.open_case`), copies the window
it needs and lets the mapping go, so a worker's memory does not grow with the number of cases. Samples
are `{"image": [C, *S] float, "label": [*S] int64, "presence": [K] bool, "case": str}` (the batch
convention of `mednets.tasks`).

Where a training patch is centred (seeded by (seed, epoch, index), so a resumed run sees exactly the
samples the uninterrupted run would have seen, in any worker):
- with probability `absent_share`, when the case lacks a structure, where that structure usually is
  (its mean centroid over the training cases, jittered): the model learns to paint nothing in an
  empty organ bed;
- else with probability `foreground_share` on a voxel of a random present structure (nnU-Net's
  foreground oversampling, from the voxel samples preprocessing stored);
- else anywhere in the case;
then moved, where it would reach past the case, back inside it (the case inside the patch where the
case is the smaller), as nnU-Net does: a patch centred on a border voxel is not half padding.
Whole-image models (SADAAn) get the whole case centre-padded (or cropped) to their grid, as prediction
gives it to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mednets.data.cropping import centre_pad_crop, window
from mednets.data.preprocessing import CachedCase, PreprocessedCache
from mednets.data.transforms import RandOrganRemovald

__all__ = ["CachedCaseDataset", "mean_centroids"]

_JITTER = 0.15  # standard deviation of an absent-organ patch's centre, as a share of the patch


def mean_centroids(cache: PreprocessedCache, cases: Sequence[str]) -> dict[int, tuple[float, ...]]:
    """Each structure's mean centroid over `cases`, as a share of the case's extent per axis: {label id: (fz, fy, fx)}."""
    found: dict[int, list[list[float]]] = {}
    for case in cases:
        for label_id, centre in cache.properties(case)["centroids"].items():
            found.setdefault(int(label_id), []).append(centre)
    return {label_id: tuple(float(v) for v in np.mean(centres, axis=0)) for label_id, centres in found.items()}


class CachedCaseDataset(torch.utils.data.Dataset):
    """Samples of cached cases: seeded training patches (or grids), or whole validation cases.

    Args:
        cache_folder: the `PreprocessedCache` folder (a path, so workers open it themselves).
        cases: case ids.
        pad_values: the normalised value of "outside the scan" per channel.
        patch_size: training patch of patch-wise models; None gives whole cases.
        grid: whole-image models' grid (the whole case centre-padded or cropped to it).
        seed: base seed of every random choice.
        repeat: each epoch visits every case this many times.
        foreground_share, absent_share: where patches are centred (module docstring).
        prior: {label id: centroid share} for absent-structure patches (`mean_centroids`).
        augment: a MONAI dictionary transform applied to `{"image", "label"}` (None: none).
        removal: organ removal applied before augmentation (None: none).
        rows: {case: (start, stop)} rows of the first axis a case is restricted to (a single 2D image
            split into training and validation rows).
    """

    def __init__(
        self,
        cache_folder: str,
        cases: Sequence[str],
        *,
        pad_values: Sequence[float],
        patch_size: Sequence[int] | None = None,
        grid: Sequence[int] | None = None,
        seed: int = 0,
        repeat: int = 1,
        foreground_share: float = 0.33,
        absent_share: float = 0.3,
        prior: Mapping[int, Sequence[float]] | None = None,
        augment: Any = None,
        removal: RandOrganRemovald | None = None,
        rows: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.cache_folder = str(cache_folder)
        self.cases = list(cases)
        self.pad_values = [float(v) for v in pad_values]
        self.patch_size = None if patch_size is None else [int(s) for s in patch_size]
        self.grid = None if grid is None else [int(s) for s in grid]
        self.seed, self.epoch, self.repeat = seed, 0, max(1, repeat)
        self.foreground_share, self.absent_share = float(foreground_share), float(absent_share)
        self.prior = {int(k): tuple(v) for k, v in (prior or {}).items()}
        self.augment, self.removal = augment, removal
        self.rows = dict(rows or {})

    def set_epoch(self, epoch: int) -> None:
        """Make the next samples depend on `epoch`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases) * self.repeat

    def _opened(self, case: str) -> CachedCase:
        cached = PreprocessedCache(self.cache_folder).open_case(case)
        if case in self.rows:
            start, stop = self.rows[case]
            keep = (cached.locations[:, 1] >= start) & (cached.locations[:, 1] < stop)
            locations = np.array(cached.locations[keep])
            locations[:, 1] -= start
            cached = CachedCase(case, cached.image[:, start:stop], cached.labels[start:stop], locations,
                                cached.properties)  # fmt: skip
        return cached

    def _patch_start(self, cached: CachedCase, rng: np.random.Generator) -> list[int]:
        assert self.patch_size is not None
        shape = np.asarray(cached.labels.shape)
        size = np.asarray(self.patch_size)
        presence = cached.presence
        absent = [k + 1 for k, present in enumerate(presence) if not present and (k + 1) in self.prior]
        if absent and rng.random() < self.absent_share:
            label_id = absent[int(rng.integers(len(absent)))]
            centre = np.asarray(self.prior[label_id]) * shape + rng.normal(0.0, _JITTER, len(shape)) * size
        elif len(cached.locations) and rng.random() < self.foreground_share:
            classes = np.unique(np.asarray(cached.locations[:, 0]))
            label_id = classes[int(rng.integers(len(classes)))]
            rows = np.flatnonzero(np.asarray(cached.locations[:, 0]) == label_id)
            centre = np.asarray(cached.locations[rows[int(rng.integers(len(rows)))], 1:], dtype=float)
        else:  # anywhere
            centre = rng.uniform(0, shape)
        # As nnU-Net: the window stays inside the case (or the case inside the window where it is the
        # smaller), so a patch centred near the border is shifted, not half padding.
        lowest, highest = np.minimum(0, shape - size), np.maximum(0, shape - size)
        return [int(v) for v in np.clip(np.round(centre - size / 2), lowest, highest)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")  # also ends plain iteration
        rng = np.random.default_rng([self.seed, self.epoch, index])
        case = self.cases[index % len(self.cases)]
        cached = self._opened(case)
        if self.grid is not None:
            image = centre_pad_crop(np.asarray(cached.image), self.grid, self.pad_values)
            labels = centre_pad_crop(np.asarray(cached.labels), self.grid, 0)
        elif self.patch_size is not None:
            start = self._patch_start(cached, rng)
            image = window(cached.image, start, self.patch_size, self.pad_values)
            labels = window(cached.labels, start, self.patch_size, 0)
        else:
            image, labels = np.array(cached.image), np.array(cached.labels)
        presence = np.asarray(cached.presence, dtype=np.float32)
        del cached  # the memory maps close here: nothing of the case stays in this process
        record: dict[str, Any] = {"image": torch.from_numpy(image), "label": torch.from_numpy(labels)[None].float(),
                                  "presence": presence}  # fmt: skip
        for transform in (self.removal, self.augment):
            if transform is not None:
                transform.set_random_state(seed=int(rng.integers(2**31)))
                record = transform(record)
        return {
            "image": torch.as_tensor(record["image"]).as_subclass(torch.Tensor).float().contiguous(),
            "label": torch.as_tensor(record["label"]).as_subclass(torch.Tensor)[0].round().long(),
            "presence": torch.as_tensor(np.asarray(record["presence"]) > 0.5),
            "case": case,
        }
