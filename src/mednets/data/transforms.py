"""Random transforms of segmentation samples, 2D and 3D: organ removal and anatomy-respecting augmentation.

Dictionary transforms on records ``{"image": [C, *S], "label": [1, *S], "presence": [K]}`` (channel
first; the samples of `mednets.data.streaming`). Histology's transforms are in `mednets.data.histology`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
)

from mednets import anatomy
from mednets.errors import ConfigError

__all__ = ["AUGMENTATIONS", "RandOrganRemovald", "allowed_flip_axes", "augmentation", "augmentation_axes"]


class RandOrganRemovald(Randomizable, MapTransform):
    """Erase one present organ from a training case, as if removed: more absent examples to learn from.

    Absent organs are rare in training data (a few nephrectomies or splenectomies among many cases),
    too few for a presence head to learn. With probability `prob` the case loses one of `organ_ids`
    that it contains: the organ's voxels become background in the label and its presence entry
    becomes 0, and in the image they take the median intensity of a shell of `margin` voxels of
    background around it, plus gaussian noise of that shell's spread (surrounding tissue filling the
    bed, as after surgery). Records: image `[C, *S]`, label `[1, *S]`, presence `[K]` (ids 1..K).

    Args:
        image_key: the image key.
        label_key: the label map key.
        organ_ids: label ids that may be removed.
        prob: probability that a case loses an organ.
        margin: shell thickness in voxels.
        presence_key: key of the presence vector (updated when the record has one).
    """

    def __init__(
        self,
        image_key: str,
        label_key: str,
        organ_ids: Sequence[int],
        prob: float = 0.2,
        *,
        margin: int = 2,
        presence_key: str = "presence",
    ) -> None:
        MapTransform.__init__(self, [image_key, label_key])
        if not 0.0 <= prob <= 1.0 or margin < 1:
            raise ConfigError("organ removal needs 0 <= prob <= 1 and margin >= 1", source="RandOrganRemovald",
                              got={"prob": prob, "margin": margin})  # fmt: skip
        self.image_key, self.label_key, self.presence_key = image_key, label_key, presence_key
        self.organ_ids = [int(i) for i in organ_ids]
        self.prob = float(prob)
        self.margin = int(margin)

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        record = dict(data)
        if not self.organ_ids or self.R.random() >= self.prob:
            return record
        label = torch.as_tensor(record[self.label_key])  # [1, *S]
        present = [i for i in self.organ_ids if bool((label == i).any())]
        if not present:
            return record
        organ = present[int(self.R.randint(len(present)))]
        organ_mask = label[0] == organ  # [*S]
        pool = {2: F.max_pool2d, 3: F.max_pool3d}[organ_mask.ndim]
        grown = pool(organ_mask[None, None].float(), 2 * self.margin + 1, stride=1, padding=self.margin)[0, 0] > 0
        shell = grown & ~organ_mask & (label[0] == 0)
        surround = shell if bool(shell.any()) else ~organ_mask
        image = torch.as_tensor(record[self.image_key]).clone()  # [C, *S]
        for channel in image:  # views: filled in place
            values = channel[surround].float()
            noise = torch.as_tensor(self.R.normal(0.0, 1.0, int(organ_mask.sum())), dtype=torch.float32)
            channel[organ_mask] = (values.median() + noise * values.std(unbiased=False)).to(channel.dtype)
        new_label = label.clone()
        new_label[0][organ_mask] = 0
        record[self.image_key], record[self.label_key] = image, new_label
        if self.presence_key in record:
            presence = np.array(record[self.presence_key], copy=True)
            presence[organ - 1] = 0
            record[self.presence_key] = presence
        return record


def allowed_flip_axes(label_names: Sequence[str] | None = None, spatial_dims: int = 3) -> list[int]:
    """Spatial axes that may be flipped without producing anatomy that does not exist.

    Abdominal anatomy is not symmetric top-bottom or front-back, so only the left-right axis
    (W, the last spatial axis) can be flipped, and only when no left/right twin organs are separate
    classes (a flip would turn the left kidney into a right kidney with the wrong label).
    """
    names = set(label_names if label_names is not None else anatomy.organ_names())
    if _has_sides(names):
        return []
    return [spatial_dims - 1]


def _has_sides(names: set[str]) -> bool:
    """Whether left and right twins are separate classes: a registry pair, or any `left_X` with `right_X`."""
    for right, left in anatomy.left_right_pairs():
        if anatomy.organ_by_id(right).name in names or anatomy.organ_by_id(left).name in names:
            return True
    return any(name.startswith("left_") and f"right_{name[5:]}" in names for name in names)


AUGMENTATIONS = ("nnunet", "light")


def augmentation(
    image_keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = ("label",),
    *,
    flip_axes: Sequence[int] = (),
    spatial_dims: int = 3,
    quarter_turns: bool = False,
    strength: str = "nnunet",
) -> Compose:
    """Random spatial and intensity transforms of training samples, in MONAI's transforms.

    Both strengths: flips on `flip_axes` only (`augmentation_axes`), quarter turns of images without an
    orientation, labels by nearest neighbour.
    - "nnunet": nnU-Net's set at its probabilities (moderated for small CPU budgets): rotations up to
      15 degrees and scalings by up to 15%, gaussian noise and blur, brightness, contrast around the
      mean, a low-resolution simulation (down- and up-sampling) and gamma.
    - "light": rotations up to 10 degrees, scalings by up to 10%, small shifts and scalings of
      intensity: for short training budgets, where the full set slows learning more than it regularises
      (benchmarks/RESULTS.md, issue 21).
    """
    if strength not in AUGMENTATIONS:
        raise ConfigError("unknown augmentation strength", source="data.augmentation", got=strength,
                          expected=f"one of {list(AUGMENTATIONS)}")  # fmt: skip
    keys = list(image_keys) + list(label_keys)
    images = list(image_keys)
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
    light = strength == "light"
    radians = float(np.deg2rad(10.0 if light else 15.0))
    transforms: list[Any] = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
    if quarter_turns:
        transforms.append(RandRotate90d(keys=keys, prob=0.75, max_k=3))
    transforms.append(RandAffined(keys=keys, prob=0.3, rotate_range=[radians] * (3 if spatial_dims == 3 else 1),
                                  scale_range=[0.1 if light else 0.15] * spatial_dims, mode=modes,
                                  padding_mode="border"))  # fmt: skip
    if light:
        transforms += [RandShiftIntensityd(keys=images, offsets=0.05, prob=0.3),
                       RandScaleIntensityd(keys=images, factors=0.1, prob=0.3)]  # fmt: skip
    else:
        transforms += [
            RandGaussianNoised(keys=images, prob=0.1, std=0.1),
            RandGaussianSmoothd(keys=images, prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
            RandScaleIntensityd(keys=images, factors=0.25, prob=0.15),
            RandScaleIntensityFixedMeand(keys=images, factors=0.25, prob=0.15),
            RandSimulateLowResolutiond(keys=images, prob=0.125, zoom_range=(0.5, 1.0),
                                       upsample_mode="trilinear" if spatial_dims == 3 else "bilinear"),
            RandAdjustContrastd(keys=images, prob=0.15, gamma=(0.7, 1.5)),
        ]  # fmt: skip
    return Compose(transforms)


def augmentation_axes(label_names: Sequence[str] | None, spatial_dims: int) -> tuple[list[int], bool]:
    """Flippable spatial axes and whether quarter turns are allowed, for these structure names.

    Anatomy (every 3D volume: a scan has a head and a foot; 2D images with `mednets.anatomy`'s organs or
    left/right twins) allows only the flips of `allowed_flip_axes`; other
    structures (cells, nuclei) have no orientation, so every axis flips and 2D images turn by quarters.
    """
    organs = set(anatomy.organ_names())
    anatomical = (
        spatial_dims == 3 or any(name in organs for name in label_names or ()) or _has_sides(set(label_names or ()))
    )
    if label_names is None or anatomical:
        return allowed_flip_axes(label_names, spatial_dims), False
    return list(range(spatial_dims)), spatial_dims == 2
