"""MONAI transform pipelines of segmentation, 2D and 3D: loading with normalisation, resampling, model-grid
resize, presence-aware patch sampling and anatomy-respecting augmentation (histology: `mednets.data.histology`).

Dictionary transforms work on MONAI-style records ``{"image": ..., "label": ..., "presence": ...}``.
Arrays are channel-first ``[C, D, H, W]`` (3D) or ``[C, H, W]`` (2D). `LoadVolumed` reads files with
`mednets.data.io` and stores, as MONAI expects, an affine whose columns follow the *array* axes
``(D, H, W)`` (the `Volume` affine with its first three columns reversed), so MONAI's spacing and
resize transforms keep geometry right.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    Spacingd,
    SpatialPad,
)
from scipy import ndimage

from mednets import anatomy
from mednets.data.intensity import DEFAULT_HU_WINDOW, normalise
from mednets.data.io import read_any
from mednets.errors import ConfigError, InvalidInputError

__all__ = [
    "LoadVolumed",
    "PresenceAwareCropd",
    "RandOrganRemovald",
    "KeepRowsd",
    "allowed_flip_axes",
    "augmentation_axes",
    "augmentation",
    "segmentation_pipeline",
    "location_prior",
    "monai_affine",
    "resample_to_spacing",
]


def monai_affine(affine: np.ndarray) -> np.ndarray:
    """Reorder a `Volume` affine (columns x, y, z = W, H, D) into MONAI's array order (D, H, W)."""
    return np.asarray(affine, dtype=np.float64)[:, [2, 1, 0, 3]]


class LoadVolumed(MapTransform):
    """Read each key's path (or list of per-channel paths) into a ``[C, *S]`` MetaTensor with its affine.

    Volumes (NIfTI, NRRD, MHA, DICOM) give ``[C, D, H, W]``; 2D images (PNG, TIFF) give ``[C, H, W]``,
    the colours of an RGB file being channels. With `channel_names`, the image key's channel files are
    normalised as they are read (`mednets.data.intensity.normalise`); label maps are left as stored.

    Args:
        keys: keys holding paths.
        dtype: dtype of the loaded arrays (None keeps the file's).
        channel_names: one name per channel file of `image_key`, or None for no normalisation.
        hu_window: the CT window of the normalisation.
        image_key: the key whose files are normalised.
    """

    def __init__(
        self,
        keys: Sequence[str],
        dtype: torch.dtype | None = torch.float32,
        allow_missing_keys: bool = False,
        *,
        channel_names: Sequence[str] | None = None,
        hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
        image_key: str = "image",
    ):
        super().__init__(keys, allow_missing_keys)
        self.dtype = dtype
        self.channel_names = None if channel_names is None else [str(n) for n in channel_names]
        self.hu_window = tuple(hu_window)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            paths = out[key] if isinstance(out[key], list | tuple) else [out[key]]
            volumes = [read_any(p) for p in paths]
            shapes = {v.spatial_shape for v in volumes}
            if len(shapes) != 1:
                raise InvalidInputError(
                    "channels differ in shape", source=", ".join(map(str, paths)), got=sorted(shapes)
                )
            names = self.channel_names if key == self.image_key else None
            if names is not None and len(names) != len(volumes):
                raise InvalidInputError("channel files do not match channel_names", source=", ".join(map(str, paths)),
                                        expected=names, got=len(volumes))  # fmt: skip
            channels = []
            for index, volume in enumerate(volumes):
                array = volume.array[None] if volume.channel_axis is None else np.moveaxis(volume.array, -1, 0)
                if names is not None:
                    array = normalise(array, names[index], self.hu_window)
                channels.append(torch.as_tensor(np.ascontiguousarray(array)))
            array = torch.cat(channels)
            if self.dtype is not None:
                array = array.to(self.dtype)
            affine = monai_affine(volumes[0].affine) if array.ndim == 4 else np.eye(4)
            out[key] = MetaTensor(array, affine=torch.as_tensor(affine), meta={"filename_or_obj": str(paths[0])})
        return out


class KeepRowsd(MapTransform):
    """Keep the rows ``[start, stop)`` of the first spatial axis named by a record's ``rows`` (if it has one).

    A dataset of a single large 2D image trains on its top and validates on its bottom rows.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        if "rows" not in out:
            return out
        start, stop = out["rows"]
        for key in self.key_iterator(out):
            out[key] = out[key][:, start:stop]
        return out


def resample_to_spacing(
    spacing_mm: Sequence[float], image_keys: Sequence[str] = ("image",), label_keys: Sequence[str] = ("label",)
) -> MapTransform:
    """Resample to `spacing_mm` ``(D, H, W)``: trilinear for images, nearest for label maps."""
    keys = list(image_keys) + list(label_keys)
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
    return Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing_mm), mode=modes, allow_missing_keys=True)


def location_prior(
    label_maps: Sequence[np.ndarray], label_ids: Mapping[str, int] | None = None
) -> dict[int, tuple[float, ...]]:
    """Mean centroid of each structure as a fraction of the volume's extent (one atlas-like prior).

    Args:
        label_maps: label maps ``[D, H, W]`` (any shapes: centroids are in fractions of the shape).
        label_ids: {name: id}; defaults to the organ registry.

    Returns:
        {label id: (fz, fy, fx)} for every structure seen at least once.
    """
    ids = [i for i in (label_ids or anatomy.label_names()).values() if i != 0]
    sums: dict[int, list[np.ndarray]] = {i: [] for i in ids}
    for labels in label_maps:
        labels = np.asarray(labels)
        with np.errstate(invalid="ignore", divide="ignore"):  # absent structures give NaN centres, skipped below
            centres = ndimage.center_of_mass(np.ones_like(labels), labels, ids)
        for label_id, centre in zip(ids, centres, strict=True):
            if np.all(np.isfinite(centre)):
                sums[label_id].append((np.asarray(centre) + 0.5) / np.asarray(labels.shape))
    return {i: tuple(float(v) for v in np.mean(c, axis=0)) for i, c in sums.items() if c}


class PresenceAwareCropd(Randomizable, MapTransform):
    """Foreground-weighted patch sampling that also visits where absent organs would be.

    With probability `absent_prob`, when the record's ``presence`` marks a structure absent, the patch
    is centred at that structure's `prior` location (a fraction of the volume, jittered), so the
    model sees the empty organ bed and learns to predict nothing there (LHA-Net, UNet3D). Otherwise
    MONAI's `RandCropByLabelClassesd` samples a class by `ratios` and centres on one of its voxels.

    Args:
        keys: keys to crop (image and label).
        label_key: the label map key.
        spatial_size: patch size ``(D, H, W)``.
        prior: {label id: (fz, fy, fx)} from `location_prior`.
        num_classes: number of classes including background.
        presence_key: key of the presence vector (one value per foreground class, in id order).
        absent_prob: probability of an absent-organ patch when one is absent.
        ratios: class sampling ratios (background first); None samples classes equally.
        jitter: standard deviation of the centre jitter, as a fraction of the patch size.
        num_samples: patches per record.
    """

    def __init__(
        self,
        keys: Sequence[str],
        label_key: str,
        spatial_size: Sequence[int],
        prior: Mapping[int, Sequence[float]],
        num_classes: int,
        *,
        presence_key: str = "presence",
        absent_prob: float = 0.3,
        ratios: Sequence[float] | None = None,
        jitter: float = 0.15,
        num_samples: int = 1,
    ):
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.pad = SpatialPad(self.spatial_size)  # cases smaller than the patch are padded to it
        self.prior = {int(k): tuple(v) for k, v in prior.items()}
        self.presence_key = presence_key
        self.absent_prob = float(absent_prob)
        self.jitter = float(jitter)
        self.num_samples = int(num_samples)
        self.by_class = RandCropByLabelClassesd(
            keys=list(keys), label_key=label_key, spatial_size=self.spatial_size, ratios=list(ratios) if ratios else None,
            num_classes=num_classes, num_samples=num_samples, warn=False, allow_smaller=True,
        )  # fmt: skip

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> PresenceAwareCropd:
        super().set_random_state(seed, state)
        self.by_class.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        record = dict(data)
        presence = record.get(self.presence_key)
        absent = (
            []
            if presence is None
            else [i + 1 for i, p in enumerate(np.asarray(presence).ravel()) if p < 0.5 and (i + 1) in self.prior]
        )
        outputs: list[dict[Hashable, Any]] = []
        for _ in range(self.num_samples):
            if absent and self.R.random() < self.absent_prob:
                outputs.append(self._crop_at(record, int(self.R.choice(absent))))
            else:  # a case smaller than the patch gives a smaller crop: padded like the prior-centred crops
                sample = self.by_class(record)[0]
                outputs.append({**sample, **{key: self.pad(sample[key]) for key in self.key_iterator(sample)}})
        return outputs

    def _crop_at(self, record: dict[Hashable, Any], label_id: int) -> dict[Hashable, Any]:
        spatial = tuple(record[self.label_key].shape[1:])
        size = np.asarray(self.spatial_size)
        centre = (
            np.asarray(self.prior[label_id]) * np.asarray(spatial)
            + self.R.normal(0.0, self.jitter, len(spatial)) * size
        )
        start = np.clip(np.round(centre - size / 2).astype(int), 0, np.maximum(np.asarray(spatial) - size, 0))
        slices = tuple(slice(int(s), int(s + n)) for s, n in zip(start, size, strict=True))
        out = dict(record)
        for key in self.key_iterator(out):
            out[key] = self.pad(out[key][(slice(None), *slices)])
        out["patch_centre_label"] = label_id
        return out


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
    for right, left in anatomy.left_right_pairs():
        if anatomy.organ_by_id(right).name in names or anatomy.organ_by_id(left).name in names:
            return []
    return [spatial_dims - 1]


def augmentation(
    image_keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = ("label",),
    *,
    flip_axes: Sequence[int] = (),
    rotate_degrees: float = 10.0,
    scale: float = 0.1,
    intensity_shift: float = 0.05,
    intensity_scale: float = 0.1,
    prob: float = 0.3,
    spatial_dims: int = 3,
    quarter_turns: bool = False,
) -> Compose:
    """Random flips on `flip_axes` only (see `allowed_flip_axes`), quarter turns of 2D images without an
    orientation, small rotations and scalings, intensity shifts."""
    keys = list(image_keys) + list(label_keys)
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
    radians = float(np.deg2rad(rotate_degrees))
    transforms: list[Any] = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
    if quarter_turns:
        transforms.append(RandRotate90d(keys=keys, prob=0.75, max_k=3))
    transforms += [
        RandAffined(
            keys=keys,
            prob=prob,
            rotate_range=[radians] * (3 if spatial_dims == 3 else 1),
            scale_range=[scale] * spatial_dims,
            mode=modes,
            padding_mode="border",
        ),
        RandShiftIntensityd(keys=list(image_keys), offsets=intensity_shift, prob=prob),
        RandScaleIntensityd(keys=list(image_keys), factors=intensity_scale, prob=prob),
    ]
    return Compose(transforms)


def augmentation_axes(label_names: Sequence[str] | None, spatial_dims: int) -> tuple[list[int], bool]:
    """Flippable spatial axes and whether quarter turns are allowed, for these structure names.

    Anatomy (names of `mednets.anatomy`'s organs) allows only the flips of `allowed_flip_axes`; other
    structures (cells, nuclei) have no orientation, so every axis flips and 2D images turn by quarters.
    """
    organs = set(anatomy.organ_names())
    if label_names is None or any(name in organs for name in label_names):
        return allowed_flip_axes(label_names, spatial_dims), False
    return list(range(spatial_dims)), spatial_dims == 2


def segmentation_pipeline(
    *,
    channel_names: Sequence[str] = ("CT",),
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    spacing_mm: Sequence[float] | None = None,
    grid: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    prior: Mapping[int, Sequence[float]] | None = None,
    num_classes: int = len(anatomy.ORGANS) + 1,
    augment: bool = True,
    label_names: Sequence[str] | None = None,
    spatial_dims: int = 3,
    remove_organ_ids: Sequence[int] = (),
    remove_organ_prob: float = 0.0,
) -> Compose:
    """The segmentation pipeline of 2D and 3D: load and normalise, resample, grid resize or patch sampling, augment.

    Args:
        channel_names: the image channels' names (`dataset.json`), which choose their normalisation.
        hu_window: the CT window (`mednets.data.intensity`).
        spacing_mm: resample to this spacing first.
        grid: whole-image resize to this model grid (SADAAn); exclusive with `patch_size`.
        patch_size: presence-aware patch sampling of this size (patch-wise models).
        prior: location prior for absent-organ patches (`location_prior`); needed with `patch_size`.
        num_classes: classes including background.
        augment: add `augmentation` with the flips `augmentation_axes` permits for `label_names`.
        label_names: foreground class names (default: the 13 organs).
        spatial_dims: 2 or 3.
        remove_organ_ids: label ids `RandOrganRemovald` may erase (with `augment` only).
        remove_organ_prob: probability that a case loses one of them.
    """
    if grid is not None and patch_size is not None:
        raise ConfigError(
            "choose either a whole-image grid or patches",
            source="pipeline",
            got={"grid": grid, "patch_size": patch_size},
        )
    keys = ["image", "label"]
    transforms: list[Any] = [
        LoadVolumed(keys, allow_missing_keys=True, channel_names=channel_names, hu_window=hu_window),
        KeepRowsd(keys, allow_missing_keys=True),
    ]
    if spacing_mm is not None:
        transforms.append(resample_to_spacing(spacing_mm))
    if grid is not None:
        mode = "trilinear" if spatial_dims == 3 else "bilinear"
        transforms.append(Resized(keys=keys, spatial_size=tuple(grid), mode=[mode, "nearest"], allow_missing_keys=True))
    if augment and remove_organ_prob > 0 and remove_organ_ids:
        transforms.append(RandOrganRemovald("image", "label", remove_organ_ids, remove_organ_prob))
    if patch_size is not None:
        transforms.append(PresenceAwareCropd(keys, "label", patch_size, prior or {}, num_classes))
    if augment:
        flip_axes, quarter_turns = augmentation_axes(label_names, spatial_dims)
        transforms.append(augmentation(flip_axes=flip_axes, quarter_turns=quarter_turns, spatial_dims=spatial_dims))
    return Compose(transforms)
