"""Dataset folders in the nnU-Net / Medical Segmentation Decathlon convention (docs/dataset_format.md).

A dataset folder holds `dataset.json`, `imagesTr/<case>_<XXXX><ending>` (one file per channel),
`labelsTr/<case><ending>` and optionally `imagesTs/`; the ending is a volume format (3D) or PNG/TIFF (2D).
`dataset.json` holds ``labels`` ({name: id}, with ``background: 0``), ``channel_names``
({"0": "CT"}), ``file_ending`` (default ``.nii.gz``), ``numTraining``, and optionally ``min_voxels``,
``presence`` (per-case overrides ``{case: {organ: true/false}}``) and ``cases`` (per-case notes,
e.g. the phantom generator's ``{"absent": {organ: reason}}``).

`load_dataset` validates everything at once and raises one `DatasetError` listing every problem with
its file name; `validate_dataset` returns the list instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednets import anatomy
from mednets.data.validation import FileCheck, check_files
from mednets.errors import DatasetError

__all__ = [
    "DEFAULT_MIN_VOXELS",
    "Case",
    "Dataset",
    "load_dataset",
    "presence_targets",
    "read_label_map",
    "split_cases",
    "validate_dataset",
]

DEFAULT_MIN_VOXELS = anatomy.MIN_VOXELS  # unless dataset.json overrides it
AFFINE_TOLERANCE_MM = 1e-3
_IMAGE_ENDINGS = (".png", ".tif", ".tiff")  # the 2D files a dataset folder may hold


def read_label_map(path: str | os.PathLike[str], rows: tuple[int, int] | None = None) -> np.ndarray:
    """A label map as stored (`[D, H, W]` or `[H, W]`), optionally only the rows ``[start, stop)`` of its first axis."""
    from mednets.data.io import read_any

    labels = read_any(path).array
    return labels[rows[0] : rows[1]] if rows is not None else labels


@dataclass(frozen=True)
class Case:
    """One case of a dataset folder.

    Attributes:
        case_id: the file stem before the channel suffix.
        images: one path per channel, in channel order.
        label: the label map, or None for test cases.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass
class Dataset:
    """A validated dataset folder.

    Attributes:
        root: the folder.
        info: the parsed `dataset.json`.
        training: cases of imagesTr/labelsTr, sorted by id.
        test: cases of imagesTs, sorted by id.
    """

    root: Path
    info: dict[str, Any]
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, int]:
        """{name: id} including background."""
        return {str(k): int(v) for k, v in self.info["labels"].items()}

    @property
    def structures(self) -> list[str]:
        """Foreground structure names in id order (the presence vector's order)."""
        return [name for name, _ in sorted(self.labels.items(), key=lambda item: item[1]) if self.labels[name] != 0]

    @property
    def min_voxels(self) -> int:
        return int(self.info.get("min_voxels", DEFAULT_MIN_VOXELS))

    @property
    def file_ending(self) -> str:
        return str(self.info.get("file_ending", ".nii.gz"))

    @property
    def spatial_dims(self) -> int:
        """2 for datasets of 2D images (PNG, TIFF), else 3."""
        from mednets.data.io import IMAGE_SUFFIXES

        return 2 if self.file_ending.lower() in IMAGE_SUFFIXES else 3

    @property
    def channel_names(self) -> list[str]:
        """The names of the channel files, in channel order (they choose each channel's normalisation)."""
        names = self.info["channel_names"]
        return [str(names[key]) for key in sorted(names, key=int)]

    def case(self, case_id: str) -> Case:
        for case in self.training + self.test:
            if case.case_id == case_id:
                return case
        raise DatasetError("no such case", source=str(self.root), got=case_id)

    def presence(self, case_id: str, labels: np.ndarray | None = None) -> dict[str, bool]:
        """Presence target per structure for a training case (reads its label map unless given)."""
        if labels is None:
            label_path = self.case(case_id).label
            if label_path is None:
                raise DatasetError("test cases have no labels", source=case_id)
            labels = read_label_map(label_path)
        overrides = self.info.get("presence", {}).get(case_id, {})
        return presence_targets(labels, self.labels, min_voxels=self.min_voxels, overrides=overrides)

    def smallest_volumes_ml(self) -> dict[str, float]:
        """The smallest volume (mL) of each structure over the training cases where it is present.

        Structures present in no training case are left out; 2D datasets (no physical voxel size) give
        none. Reads every training label map.
        """
        from mednets.data.io import read_volume

        if self.spatial_dims == 2:
            return {}
        smallest: dict[str, float] = {}
        for case in self.training:
            assert case.label is not None  # training cases always have labels (validated on load)
            label = read_volume(case.label)
            present = self.presence(case.case_id, label.array)
            counts = np.bincount(label.array.ravel().astype(np.int64), minlength=max(self.labels.values()) + 1)
            for name in self.structures:
                if present[name]:
                    volume = float(counts[self.labels[name]]) * label.voxel_volume_ml()
                    smallest[name] = min(smallest.get(name, volume), volume)
        return smallest

    def records(self, cases: list[str] | None = None) -> list[dict[str, Any]]:
        """MONAI-style data list: ``{"image": [paths], "label": path, "case": id, "presence": [0/1 ...]}``.

        `presence` follows `structures` order and is only filled from the JSON overrides and the
        label map, so this reads each label map once.
        """
        chosen = self.training if cases is None else [self.case(c) for c in cases]
        records = []
        for case in chosen:
            record: dict[str, Any] = {"case": case.case_id, "image": [str(p) for p in case.images]}
            if case.label is not None:
                record["label"] = str(case.label)
                flags = self.presence(case.case_id)
                record["presence"] = [float(flags[name]) for name in self.structures]
            records.append(record)
        return records


def presence_targets(
    labels: np.ndarray,
    label_ids: dict[str, int],
    *,
    min_voxels: int = DEFAULT_MIN_VOXELS,
    overrides: dict[str, bool] | None = None,
) -> dict[str, bool]:
    """Presence of each foreground structure: at least `min_voxels` voxels, unless overridden.

    Args:
        labels: integer label map (any shape).
        label_ids: {name: id}; id 0 (background) is skipped.
        min_voxels: voxel count from which a structure counts as present.
        overrides: {name: present} that win over the voxel count (e.g. an organ known to be resected
            whose label map still holds a few voxels of scar).

    Returns:
        {name: present} for every foreground structure.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=max(label_ids.values()) + 1)
    overrides = overrides or {}
    return {
        name: bool(overrides[name]) if name in overrides else bool(counts[index] >= min_voxels)
        for name, index in label_ids.items()
        if index != 0
    }


def split_cases(case_ids: list[str], *, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: same ids and seed, same split, whatever the listing order.

    Returns:
        (train ids, validation ids), each sorted; validation holds at least one case when there are two or more.
    """
    ids = sorted(case_ids)
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError("val_fraction must be in [0, 1)", source="val_fraction", got=val_fraction)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = round(len(ids) * val_fraction)
    if val_fraction > 0 and len(ids) >= 2:
        n_val = max(n_val, 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


_CHANNEL_PATTERN = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _stem(path: Path, ending: str) -> str | None:
    return path.name[: -len(ending)] if path.name.endswith(ending) else None


def _scan_images(folder: Path, ending: str, channels: list[int], problems: list[str]) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        stem = _stem(path, ending)
        if stem is None:
            problems.append(f"{path}: unexpected file (images end in {ending})")
            continue
        match = _CHANNEL_PATTERN.match(stem)
        if match is None:
            problems.append(f"{path}: missing channel suffix (expected <case>_0000{ending})")
            continue
        channel = int(match["channel"])
        if channel not in channels:
            problems.append(
                f"{path}: wrong channel suffix _{match['channel']} (channel_names declares {', '.join(f'{c:04d}' for c in channels)})"
            )
            continue
        found.setdefault(match["case"], {})[channel] = path
    for case_id, by_channel in found.items():
        for channel in channels:
            if channel not in by_channel:
                problems.append(
                    f"{folder / f'{case_id}_{channel:04d}{ending}'}: missing channel file of case {case_id}"
                )
    return found


def validate_dataset(root: str | os.PathLike[str], *, quick: bool = False, progress: bool = False) -> list[str]:
    """Check a dataset folder against docs/dataset_format.md; return every problem found (empty when valid).

    Every image and label map is read whole, a few files in parallel (see `mednets.data.validation`).

    Args:
        root: the dataset folder.
        quick: read only the headers of volume files: layout, shapes and geometry are checked, voxel
            values (truncated data, NaN, label values) are not.
        progress: show a progress bar while the files are read.

    Returns:
        One line per problem, naming its file, in the same order for the same folder.
    """
    problems, _ = _validate(Path(root), quick=quick, progress=progress)
    return problems


def load_dataset(root: str | os.PathLike[str], *, quick: bool = False, progress: bool = False) -> Dataset:
    """Validate (as `validate_dataset` does) and open a dataset folder.

    Raises:
        DatasetError: the folder breaks the format; the message lists every problem with its file.
    """
    problems, dataset = _validate(Path(root), quick=quick, progress=progress)
    if problems or dataset is None:
        count = len(problems)
        raise DatasetError(
            f"{count} problem{'s' if count != 1 else ''} in dataset folder:\n  " + "\n  ".join(problems),
            source=str(root),
        )
    return dataset


def _read_info(root: Path, problems: list[str]) -> dict[str, Any] | None:
    info_path = root / "dataset.json"
    if not root.is_dir():
        problems.append(f"{root}: dataset folder not found")
        return None
    if not info_path.is_file():
        problems.append(f"{info_path}: missing dataset.json")
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.append(f"{info_path}: not valid JSON ({error})")
        return None
    if not isinstance(info, dict):
        problems.append(f"{info_path}: must hold a JSON object")
        return None
    labels = info.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append(f"{info_path}: field 'labels' must be a non-empty object {{name: id}}")
        info["labels"] = {"background": 0}
    else:
        ids = list(labels.values())
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
            problems.append(f"{info_path}: field 'labels' must map names to non-negative integer ids, got {labels}")
            info["labels"] = {"background": 0}
        elif len(set(ids)) != len(ids):
            problems.append(f"{info_path}: field 'labels' has duplicate ids {sorted(ids)}")
        elif 0 not in ids:
            problems.append(f"{info_path}: field 'labels' must declare background as 0")
    channels = info.get("channel_names")
    if not isinstance(channels, dict) or not channels or not all(str(k).isdigit() for k in channels):
        problems.append(f'{info_path}: field \'channel_names\' must be an object {{"0": "CT", ...}}')
        info["channel_names"] = {"0": "CT"}
    return info


def _validate(root: Path, *, quick: bool, progress: bool) -> tuple[list[str], Dataset | None]:
    problems: list[str] = []
    info = _read_info(root, problems)
    if info is None:
        return problems, None
    info_path = root / "dataset.json"
    ending = str(info.get("file_ending", ".nii.gz"))
    channels = sorted(int(k) for k in info["channel_names"])

    images_dir, labels_dir, test_dir = root / "imagesTr", root / "labelsTr", root / "imagesTs"
    training_images: dict[str, dict[int, Path]] = {}
    if images_dir.is_dir():
        training_images = _scan_images(images_dir, ending, channels, problems)
        if all(_stem(p, ending) is None for p in images_dir.iterdir() if not p.name.startswith(".")):
            problems.append(f"{images_dir}: no training images ending in {ending}")
    else:
        problems.append(f"{images_dir}: missing imagesTr folder")
    label_files: dict[str, Path] = {}
    if labels_dir.is_dir():
        for path in sorted(labels_dir.iterdir()):
            if path.name.startswith("."):
                continue
            stem = _stem(path, ending)
            if stem is None:
                problems.append(f"{path}: unexpected file (labels end in {ending})")
            else:
                label_files[stem] = path
    else:
        problems.append(f"{labels_dir}: missing labelsTr folder")
    test_images = _scan_images(test_dir, ending, channels, problems) if test_dir.is_dir() else {}

    images = [path for found in (training_images, test_images) for case in found.values() for path in case.values()]
    declared = [int(v) for v in info["labels"].values()]
    checks = check_files(images, list(label_files.values()), label_ids=declared, quick=quick, progress=progress)
    problems.extend(problem for check in checks.values() for problem in check.problems)
    if ending.lower() in _IMAGE_ENDINGS:
        problems.extend(_colour_problems([checks[path] for path in images]))

    training: list[Case] = []
    for case_id in sorted(training_images):
        by_channel = training_images[case_id]
        label = label_files.get(case_id)
        if label is None:
            problems.append(f"{labels_dir / (case_id + ending)}: missing label file for case {case_id}")
        if not all(c in by_channel for c in channels):
            continue
        case_images = tuple(by_channel[c] for c in channels)
        training.append(Case(case_id, case_images, label))
        if label is not None:
            problems.extend(_geometry_problems([checks[path] for path in case_images], checks[label]))
    for case_id, path in label_files.items():
        if case_id not in training_images:
            problems.append(f"{path}: label file without an image ({images_dir / f'{case_id}_0000{ending}'} missing)")

    expected = info.get("numTraining")
    if expected is not None and expected != len(training_images):
        problems.append(f"{info_path}: numTraining is {expected} but imagesTr holds {len(training_images)} cases")
    names = set(info["labels"])
    for field_name in ("presence", "cases"):
        block = info.get(field_name, {})
        if not isinstance(block, dict):
            problems.append(f"{info_path}: field '{field_name}' must be an object {{case: ...}}")
            continue
        for case_id, entry in block.items():
            if case_id not in training_images:
                problems.append(f"{info_path}: field '{field_name}' names unknown case {case_id}")
            elif field_name == "presence":
                if not isinstance(entry, dict) or not all(isinstance(v, bool) for v in entry.values()):
                    problems.append(f"{info_path}: presence of {case_id} must be {{structure: true/false}}")
                else:
                    for name in set(entry) - names:
                        problems.append(f"{info_path}: presence of {case_id} names undeclared structure {name}")

    test = [
        Case(case_id, tuple(by_channel[c] for c in channels))
        for case_id, by_channel in sorted(test_images.items())
        if all(c in by_channel for c in channels)
    ]
    return list(dict.fromkeys(problems)), Dataset(root, info, training, test)


def _geometry_problems(images: list[FileCheck], label: FileCheck) -> list[str]:
    """A label map on the grid of each of its case's images: same shape, same affine."""
    problems = []
    for image in images:
        if image.shape is None or label.shape is None:
            continue  # already reported as unreadable
        if image.shape != label.shape:
            problems.append(
                f"{label.path}: shape {label.shape} differs from image {image.path.name} shape {image.shape}"
            )
        elif not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM):
            worst = float(np.abs(image.affine - label.affine).max())
            problems.append(f"{label.path}: affine differs from image {image.path.name} (by up to {worst:.4g} mm)")
    return problems


def _colour_problems(images: list[FileCheck]) -> list[str]:
    """2D datasets: the files of one channel have the same number of colour channels (the most common one)."""
    colours: dict[str, dict[int, list[Path]]] = {}
    for check in images:
        if check.shape is not None and len(check.shape) == 2:  # single-page images; others are reported
            colours.setdefault(check.path.stem[-4:], {}).setdefault(check.colours, []).append(check.path)
    problems = []
    for channel, by_count in sorted(colours.items()):
        usual = max(by_count, key=lambda count: len(by_count[count]))
        problems.extend(
            f"{path}: {count} colour channel(s), other files of channel {channel} have {usual}"
            for count, paths in sorted(by_count.items())
            for path in paths
            if count != usual
        )
    return problems
