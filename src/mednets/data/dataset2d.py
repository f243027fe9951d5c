"""2D dataset folders: the dataset folder convention of docs/dataset_format.md with PNG or TIFF files.

A 2D dataset folder is a dataset folder whose ``file_ending`` is ``.png``, ``.tif`` or ``.tiff``::

    dataset.json                {"labels": {"background": 0, "nucleus": 1}, "channel_names": {"0": "fluorescence"},
                                 "file_ending": ".tif"}
    imagesTr/<case>_0000.tif    one 2D image per channel file: grey [H, W] or colour [H, W, 3|4]
    labelsTr/<case>.tif         integer label map [H, W], same height and width

On top of the checks of `mednets.data.dataset` (names, channels, shapes, declared label values),
`validate_dataset_2d` checks that every image is one 2D page, that every channel file of a channel
has the same number of colour channels, and that label maps are single-channel integer images.

Intensities (`normalise_2d`): channels named ``CT`` are windowed (``hu_window``, HU -> [0, 1]); uint8
images are divided by 255; anything else (e.g. uint16 fluorescence) is scaled per image between its
0.5th and 99.5th percentiles. Training and prediction both use it.

Built-in sources: `write_phantom_slice_datasets` writes axial slices of the CT phantoms (13 organs +
background), `split_image_pair` turns one image and its mask into a training folder (left half) and
a test folder (right half).
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
from mednets.data.dataset import Case, Dataset, load_dataset, validate_dataset
from mednets.data.images2d import read_image_2d
from mednets.data.io import Volume, read_image, write_volume
from mednets.data.phantoms import PhantomConfig, generate_phantom
from mednets.errors import ConfigError, DatasetError

__all__ = [
    "FILE_ENDINGS_2D",
    "load_dataset_2d",
    "normalise_2d",
    "read_case_2d",
    "split_image_pair",
    "validate_dataset_2d",
    "write_dataset_2d",
    "write_phantom_slice_datasets",
]

FILE_ENDINGS_2D = (".png", ".tif", ".tiff")
PERCENTILES = (0.5, 99.5)


def validate_dataset_2d(root: str | os.PathLike[str], *, check_values: bool = True) -> list[str]:
    """Every problem of a 2D dataset folder (empty when valid): the folder checks plus the 2D ones."""
    root = Path(root)
    problems = validate_dataset(root, check_values=check_values)
    try:
        info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        ending = str(info.get("file_ending", ".nii.gz"))
    except (OSError, ValueError, AttributeError):
        return problems  # already reported
    if ending.lower() not in FILE_ENDINGS_2D:
        problems.append(
            f"{root / 'dataset.json'}: field 'file_ending' must be one of {', '.join(FILE_ENDINGS_2D)} "
            f"for a 2D dataset, got {ending}"
        )
        return problems
    colours: dict[str, dict[int, list[Path]]] = {}
    for folder in ("imagesTr", "imagesTs"):
        for path in sorted((root / folder).glob(f"*{ending}")) if (root / folder).is_dir() else []:
            try:
                volume = read_image(path)
            except Exception as error:
                problems.append(f"{path}: cannot read image file ({error})")
                continue
            pages = volume.array.ndim - (2 if volume.channel_axis is None else 3)
            if pages:
                problems.append(f"{path}: holds {volume.array.shape[0]} pages; a 2D dataset holds one page per file")
                continue
            count = 1 if volume.channel_axis is None else int(volume.array.shape[-1])
            colours.setdefault(path.stem[-4:], {}).setdefault(count, []).append(path)
    for channel, by_count in colours.items():
        if len(by_count) > 1:
            usual = max(by_count, key=lambda c: len(by_count[c]))
            for count, paths in by_count.items():
                problems.extend(
                    f"{path}: {count} colour channel(s), other files of channel {channel} have {usual}"
                    for path in paths
                    if count != usual
                )
    for path in sorted((root / "labelsTr").glob(f"*{ending}")) if (root / "labelsTr").is_dir() else []:
        try:
            volume = read_image(path)
        except Exception as error:
            problems.append(f"{path}: cannot read label file ({error})")
            continue
        if volume.array.ndim != 2 or volume.channel_axis is not None:
            problems.append(f"{path}: a label map must be one single-channel 2D image, got shape {volume.array.shape}")
        elif not np.issubdtype(volume.array.dtype, np.integer) and volume.array.dtype != bool:
            problems.append(f"{path}: a label map must hold integers, got {volume.array.dtype}")
    return list(dict.fromkeys(problems))


def load_dataset_2d(root: str | os.PathLike[str], *, check_values: bool = True) -> Dataset:
    """Validate and open a 2D dataset folder.

    Raises:
        DatasetError: the folder breaks the format; the message lists every problem with its file.
    """
    problems = validate_dataset_2d(root, check_values=check_values)
    if problems:
        count = len(problems)
        raise DatasetError(
            f"{count} problem{'s' if count != 1 else ''} in 2D dataset folder:\n  " + "\n  ".join(problems),
            source=str(root),
        )
    return load_dataset(root, check_values=False)


def normalise_2d(array: np.ndarray, channel_name: str, hu_window: Sequence[float]) -> np.ndarray:
    """One channel file's pixels ``[H, W]`` or ``[H, W, C]`` as float32 ``[C, H, W]`` in [0, 1] (module docstring)."""
    array = np.asarray(array)
    image = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if channel_name.upper() == "CT":
        low, high = hu_window
        scaled = (image.astype(np.float32) - low) / (high - low)
    elif image.dtype == np.uint8:
        scaled = image.astype(np.float32) / 255.0
    else:
        low, high = np.percentile(image, PERCENTILES)
        scaled = (image.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return np.ascontiguousarray(np.clip(scaled, 0.0, 1.0), dtype=np.float32)


def read_case_2d(dataset: Dataset, case: Case, hu_window: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """A case's normalised image ``[C, H, W]`` (channel files concatenated) and label map ``[H, W]`` int64 (or None)."""
    names = [str(dataset.info["channel_names"][key]) for key in sorted(dataset.info["channel_names"], key=int)]
    image = np.concatenate(
        [
            normalise_2d(read_image_2d(path).array, name, hu_window)
            for path, name in zip(case.images, names, strict=True)
        ]
    )
    label = None if case.label is None else read_image_2d(case.label).array.astype(np.int64)
    return image, label


def write_dataset_2d(
    root: str | os.PathLike[str],
    cases: Sequence[tuple[str, np.ndarray, np.ndarray]],
    labels: Mapping[str, int],
    *,
    channel_name: str,
    file_ending: str = ".tif",
    name: str = "dataset2d",
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `(case id, image [H, W] or [H, W, C], label map [H, W])` triples as a 2D dataset folder.

    Raises:
        ConfigError: unsupported `file_ending`, or `root` is not empty and `overwrite` is False.
    """
    if file_ending not in FILE_ENDINGS_2D:
        raise ConfigError("unsupported file ending", source="file_ending", expected=FILE_ENDINGS_2D, got=file_ending)
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


def write_phantom_slice_datasets(
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
            write_dataset_2d(path, cases, anatomy.label_names(), channel_name="CT", name="mednets_phantom_slices",
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
            write_dataset_2d(Path(out) / part, cases, labels, channel_name=channel_name, name=f"{stem}_{part}",
                             extra={"source": {"image": str(image_path), "mask": str(mask_path)}}, overwrite=overwrite)
        )  # fmt: skip
    return paths[0], paths[1]
