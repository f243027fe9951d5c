"""A dataset's fingerprint: what planning needs to know about every training case, read once.

Per case: shape, voxel size and orientation, the body box (`mednets.data.cropping`), per channel the
intensity statistics inside the labelled foreground, the voxels of each structure and its presence.
Over the dataset: the foreground intensities pooled from a seeded sample of every case (nnU-Net's
`percentile_00_5` / `percentile_99_5` / mean / std), from which CT normalisation is planned.

The fingerprint is written as JSON into the dataset's cache folder with a signature of the dataset's
files (names, sizes, modification times, dataset.json): it is read again while the files are unchanged
and extracted again when they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednets.atomic import atomic_write_text
from mednets.data.cropping import body_box
from mednets.data.dataset import Case, Dataset
from mednets.data.intensity import PERCENTILES, scheme_for_channel
from mednets.data.parallel import map_cases
from mednets.errors import DatasetError, InvalidInputError

__all__ = [
    "FOREGROUND_SAMPLES",
    "CaseFingerprint",
    "Fingerprint",
    "dataset_signature",
    "extract_fingerprint",
    "load_or_extract_fingerprint",
    "read_case_arrays",
]

log = logging.getLogger(__name__)

FOREGROUND_SAMPLES = 10_000  # foreground voxels sampled per case and channel (nnU-Net's number)
SPACING_OUTLIER = 10.0  # a case whose voxel size differs this many times from the median has a wrong header
FINGERPRINT_VERSION = 1


@dataclass
class CaseFingerprint:
    """One training case, as read.

    Attributes:
        case: case id.
        shape: spatial shape `[D, H, W]` (or `[H, W]`).
        spacing: voxel size in mm per array axis (2D images: 1.0).
        orientation: axis codes (3D), else None.
        box: the body box, ((start, stop), ...) per axis.
        dtype: the first channel's stored dtype.
        intensity: per channel, mean/std/min/max/percentiles inside the foreground (empty when no foreground).
        voxels: voxels per structure name.
        present: presence per structure name (the label map and dataset.json's overrides).
    """

    case: str
    shape: list[int]
    spacing: list[float]
    orientation: str | None
    box: list[list[int]]
    dtype: str
    intensity: list[dict[str, float]]
    voxels: dict[str, int]
    present: dict[str, bool]

    @property
    def cropped_extent_mm(self) -> np.ndarray:
        return np.array([stop - start for start, stop in self.box], dtype=float) * np.array(self.spacing)


@dataclass
class Fingerprint:
    """The fingerprint of a dataset folder (module docstring).

    Attributes:
        signature: `dataset_signature` of the folder when it was read.
        channel_names: the channels' names in order.
        structures: foreground structure names in label order.
        cases: one `CaseFingerprint` per training case.
        foreground: per channel, statistics of the foreground intensities pooled over the cases.
        version: the format's version (a newer mednets reads older fingerprints again).
    """

    signature: str
    channel_names: list[str]
    structures: list[str]
    cases: list[CaseFingerprint]
    foreground: list[dict[str, float]] = field(default_factory=list)
    version: int = FINGERPRINT_VERSION

    @property
    def spatial_dims(self) -> int:
        return len(self.cases[0].shape)

    def spacings(self) -> np.ndarray:
        """`[N, dims]` voxel sizes."""
        return np.array([case.spacing for case in self.cases], dtype=float)

    def presence_counts(self) -> dict[str, int]:
        """In how many cases each structure is present."""
        return {name: sum(case.present[name] for case in self.cases) for name in self.structures}

    def orientation(self) -> str | None:
        """The most common orientation (the one training reorients every case to)."""
        counts = Counter(case.orientation for case in self.cases)
        return counts.most_common(1)[0][0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        data = json.loads(text)
        data["cases"] = [CaseFingerprint(**case) for case in data["cases"]]
        return cls(**data)


def dataset_signature(dataset: Dataset) -> str:
    """A hash of the training files' names, sizes and modification times and of dataset.json's content."""
    digest = hashlib.sha256((dataset.root / "dataset.json").read_bytes())
    for case in dataset.training:
        for path in (*case.images, case.label):
            if path is None:
                continue
            stat = os.stat(path)
            digest.update(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _statistics(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    low, high = np.percentile(values, PERCENTILES)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "percentile_00_5": float(low), "percentile_99_5": float(high)}  # fmt: skip


def read_case_arrays(case: Case) -> tuple[list[np.ndarray], np.ndarray | None, Any]:
    """The channels `[*S]` each, the label map `[*S]` (or None) and the first channel's `Volume`.

    Raises:
        InvalidInputError: channels of different shapes, or a label map of another shape.
    """
    from mednets.data.io import read_any

    volumes = [read_any(path) for path in case.images]
    channels: list[np.ndarray] = []
    for volume in volumes:
        array = volume.array if volume.channel_axis is None else np.moveaxis(volume.array, -1, 0)
        channels.extend([array] if volume.channel_axis is None else list(array))
    shapes = {channel.shape for channel in channels}
    labels = None
    if case.label is not None:
        labels = np.asarray(read_any(case.label).array)
        shapes.add(labels.shape)
    if len(shapes) != 1:
        raise InvalidInputError("the channels and label map of a case differ in shape", source=case.case_id,
                                got=sorted(shapes))  # fmt: skip
    return channels, labels, volumes[0]


def _case_fingerprint(job: tuple[Dataset, Case, int]) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """The fingerprint of one case and its sampled foreground intensities per channel."""
    dataset, case, seed = job
    channels, labels, volume = read_case_arrays(case)
    assert labels is not None  # training cases have labels (validated on load)
    schemes = [scheme_for_channel(name, channels[0].dtype) for name in _expanded_names(dataset, len(channels))]
    foreground = labels > 0
    rng = np.random.default_rng([seed, int(hashlib.sha256(case.case_id.encode()).hexdigest()[:8], 16)])
    where = np.flatnonzero(foreground)
    chosen = rng.choice(where, min(FOREGROUND_SAMPLES, where.size), replace=False) if where.size else where
    samples = [channel.reshape(-1)[chosen].astype(np.float32) for channel in channels]
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=max(dataset.labels.values()) + 1)
    present = dataset.presence(case.case_id, labels)
    spacing = list(volume.spacing) if len(volume.spatial_shape) == 3 else [1.0] * labels.ndim
    return (
        CaseFingerprint(
            case=case.case_id, shape=list(labels.shape), spacing=[float(s) for s in spacing],
            orientation=volume.orientation if labels.ndim == 3 else None,
            box=[list(pair) for pair in body_box(channels, schemes, labels)], dtype=str(channels[0].dtype),
            intensity=[_statistics(values) for values in samples],
            voxels={name: int(counts[dataset.labels[name]]) for name in dataset.structures},
            present={name: bool(present[name]) for name in dataset.structures},
        ),
        samples,
    )  # fmt: skip


def _expanded_names(dataset: Dataset, count: int) -> list[str]:
    """One channel name per array channel (an RGB file's three colours share their file's name)."""
    names = dataset.channel_names
    return names if len(names) == count else [names[0]] * count


def extract_fingerprint(
    dataset: Dataset, *, workers: int | None = None, progress: bool = True, seed: int = 0, signature: str | None = None
) -> Fingerprint:
    """Read every training case once (in worker processes) into the dataset's fingerprint.

    `signature` is the dataset's `dataset_signature` when the caller has it already (else computed).

    Raises:
        DatasetError: a case that cannot be read (every such case named), or whose voxel size differs
            tenfold from the dataset's median on an axis (a wrong header: it would be resampled to
            a tenth or ten times its size).
    """
    jobs = [(dataset, case, seed) for case in dataset.training]
    results: dict[str, tuple[CaseFingerprint, list[np.ndarray]]] = {}
    problems = []
    for (_, case, _), result, error in map_cases(_case_fingerprint, jobs, workers=workers, desc="fingerprint",
                                                 progress=progress):  # fmt: skip
        if error is not None:
            problems.append(f"{case.case_id}: {error}")
        else:
            results[case.case_id] = result
    if problems:
        raise DatasetError("cases could not be read: " + "; ".join(problems), source=str(dataset.root))
    cases = [results[case.case_id][0] for case in dataset.training]
    for entry in cases:
        if not any(entry.voxels.values()):
            log.warning("case %s has no labelled voxel: it trains as background only", entry.case)
    channels = len(cases[0].intensity)
    pooled = [np.concatenate([results[c.case][1][k] for c in cases]) for k in range(channels)]
    fingerprint = Fingerprint(signature or dataset_signature(dataset), _expanded_names(dataset, channels), dataset.structures,
                              cases, [_statistics(values) for values in pooled])  # fmt: skip
    _check_spacings(fingerprint, dataset.root)
    return fingerprint


def _check_spacings(fingerprint: Fingerprint, root: Path) -> None:
    spacings = fingerprint.spacings()
    median = np.median(spacings, axis=0)
    ratio = np.maximum(spacings / median, median / spacings).max(axis=1)
    outliers = [f"{case.case} ({[round(s, 3) for s in case.spacing]} mm)"
                for case, r in zip(fingerprint.cases, ratio, strict=True) if r >= SPACING_OUTLIER]  # fmt: skip
    if outliers:
        raise DatasetError(f"voxel size differs {SPACING_OUTLIER:g}-fold or more from the dataset's median "
                           f"{[round(s, 3) for s in median]} mm; is the header right?", source=str(root),
                           got=outliers)  # fmt: skip


def load_or_extract_fingerprint(
    dataset: Dataset, folder: Path, *, workers: int | None = None, progress: bool = True
) -> Fingerprint:
    """The fingerprint saved in `folder` while the dataset's files are unchanged, else a new one (saved)."""
    path = folder / "fingerprint.json"
    signature = dataset_signature(dataset)
    if path.is_file():
        try:
            saved = Fingerprint.from_json(path.read_text(encoding="utf-8"))
            if saved.signature == signature and saved.version == FINGERPRINT_VERSION:
                return saved
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable or older fingerprint is extracted again
    fingerprint = extract_fingerprint(dataset, workers=workers, progress=progress, signature=signature)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, fingerprint.to_json())
    return fingerprint
