"""Writers and converters into the dataset folder format: image pairs, phantom slices and phantom volumes.

- `write_image_dataset`: `(case id, image, label map)` triples of 2D images as a dataset folder
  (PNG or TIFF files; docs/dataset_format.md);
- `split_image_pair`: one image and its mask as a training folder (left half) and a test folder
  (right half);
- `ensure_phantom_datasets`: the built-in phantoms as training and test folders, as 3D volumes or as
  axial slices (2D), generated once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mednets import anatomy
from mednets.atomic import atomic_write_text
from mednets.data.io import read_image_2d, write_volume
from mednets.data.phantoms import PhantomConfig, generate_phantom, write_phantom_dataset
from mednets.data.volume import Volume
from mednets.errors import ConfigError, DatasetError

__all__ = ["IMAGE_DATASET_ENDINGS", "ensure_phantom_datasets", "split_image_pair", "write_image_dataset"]

IMAGE_DATASET_ENDINGS = (".png", ".tif", ".tiff")


def write_image_dataset(
    root: str | os.PathLike[str],
    cases: Sequence[tuple[str, np.ndarray, np.ndarray]],
    labels: Mapping[str, int],
    *,
    channel_name: str,
    file_ending: str = ".tif",
    name: str = "images",
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `(case id, image [H, W] or [H, W, C], label map [H, W])` triples as a dataset folder of 2D images.

    Raises:
        ConfigError: unsupported `file_ending`, or `root` is not empty and `overwrite` is False.
    """
    if file_ending not in IMAGE_DATASET_ENDINGS:
        raise ConfigError(
            "unsupported file ending", source="file_ending", expected=IMAGE_DATASET_ENDINGS, got=file_ending
        )
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError("output folder is not empty (pass overwrite to replace it)", source=str(root))
        for folder in ("imagesTr", "labelsTr", "imagesTs"):
            shutil.rmtree(root / folder, ignore_errors=True)
    for case_id, image, label in cases:
        colour = np.asarray(image).ndim == 3
        write_volume(
            Volume(image, channel_axis=-1 if colour else None), root / "imagesTr" / f"{case_id}_0000{file_ending}"
        )
        write_volume(Volume(np.asarray(label)), root / "labelsTr" / f"{case_id}{file_ending}")
    info = {
        "name": name,
        "channel_names": {"0": channel_name},
        "labels": dict(labels),
        "numTraining": len(cases),
        "file_ending": file_ending,
        **dict(extra or {}),
    }
    atomic_write_text(root / "dataset.json", json.dumps(info, indent=2) + "\n")
    return root


def _organ_slices(labels: np.ndarray, count: int) -> list[int]:
    """`count` axial slice indices evenly spaced over the slices that hold any organ."""
    with_organs = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))
    if with_organs.size == 0:
        return []
    return sorted(set(np.linspace(with_organs[0], with_organs[-1], count).round().astype(int).tolist()))


def _write_phantom_slice_datasets(
    folder: str | os.PathLike[str],
    *,
    n_train: int,
    n_test: int,
    shape: Sequence[int],
    seed: int = 0,
    slices_per_case: int = 8,
) -> tuple[Path, Path]:
    """Axial slices of CT phantoms as 2D datasets `folder/train` and `folder/test`, unless present.

    Slices are int16 HU TIFFs (channel ``CT``) with uint8 label maps of the 13 organs (14 classes with
    background); test phantoms are drawn with `seed + 1`, so no phantom is in both sets.
    """
    folder = Path(folder)
    config = PhantomConfig(shape=tuple(int(s) for s in shape))  # type: ignore[arg-type]
    paths = []
    for part, count, part_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        path = folder / part
        if not (path / "dataset.json").is_file():
            cases = []
            for index in range(count):
                phantom = generate_phantom(part_seed, config, case_index=index)
                for z in _organ_slices(phantom.labels, slices_per_case):
                    cases.append((f"phantom_{index:03d}_z{z:03d}", phantom.image[z], phantom.labels[z]))
            generator = {"seed": part_seed, "phantoms": count, "shape": list(config.shape)}
            write_image_dataset(path, cases, anatomy.label_names(), channel_name="CT", name="mednets_phantom_slices",
                             extra={"generator": generator}, overwrite=True)  # fmt: skip
        paths.append(path)
    return paths[0], paths[1]


def split_image_pair(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    structure: str = "foreground",
    channel_name: str = "image",
    binary: bool = True,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """One image and its mask as two 2D datasets: `out/train` (left half) and `out/test` (right half).

    Args:
        image_path: the image (grey or colour).
        mask_path: its label map, same height and width.
        out: output folder.
        structure: name of label 1 when `binary`.
        channel_name: the image channel's name in dataset.json.
        binary: label map = mask > 0 (e.g. an instance mask of nuclei).
        overwrite: replace existing output.

    Raises:
        DatasetError: image and mask differ in size, or the mask is not a single-channel integer image.
    """
    image, mask = read_image_2d(image_path).array, read_image_2d(mask_path).array
    if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise DatasetError("mask must be a single-channel integer image", source=str(mask_path), got=mask.shape)
    if image.shape[:2] != mask.shape:
        raise DatasetError("image and mask differ in size", source=str(mask_path), expected=image.shape[:2],
                           got=mask.shape)  # fmt: skip
    labels = {"background": 0, structure: 1} if binary else {"background": 0, **{f"label_{v}": int(v)
              for v in np.unique(mask) if v != 0}}  # fmt: skip
    label_map = (mask > 0).astype(np.uint8) if binary else mask
    half = image.shape[1] // 2
    stem = Path(image_path).stem
    paths = []
    for part, columns in (("train", slice(0, half)), ("test", slice(half, None))):
        cases = [(f"{stem}_{'left' if part == 'train' else 'right'}", image[:, columns], label_map[:, columns])]
        paths.append(
            write_image_dataset(Path(out) / part, cases, labels, channel_name=channel_name, name=f"{stem}_{part}",
                             extra={"source": {"image": str(image_path), "mask": str(mask_path)}}, overwrite=overwrite)
        )  # fmt: skip
    return paths[0], paths[1]


def ensure_phantom_datasets(
    folder: str | os.PathLike[str], phantoms: Any, *, spatial_dims: int = 3
) -> tuple[Path, Path]:
    """The phantom training and test sets in `folder/train` and `folder/test`, generated unless present.

    Test cases are drawn with another seed (`seed + 1`), so no case is in both sets. With
    `spatial_dims=2` the sets hold axial slices of the phantoms.
    """
    folder = Path(folder)
    if spatial_dims == 2:
        return _write_phantom_slice_datasets(folder, n_train=phantoms.n_train, n_test=phantoms.n_test,
                                             shape=phantoms.shape, seed=phantoms.seed)  # fmt: skip
    config = PhantomConfig(shape=tuple(phantoms.shape))
    paths = []
    for part, count, seed in (("train", phantoms.n_train, phantoms.seed), ("test", phantoms.n_test, phantoms.seed + 1)):
        path = folder / part
        if not (path / "dataset.json").is_file():
            write_phantom_dataset(path, count, seed, config, overwrite=True)
        paths.append(path)
    return paths[0], paths[1]
