"""Per-structure statistics of a label map, as TotalSegmentator's `statistics.json` plus presence.

Per structure: voxels, volume (mL), intensity mean / median / std / min / max of the input image
inside it (HU for CT; the first channel of a multi-channel image), bounding box (voxel indices in
array order, first and last inclusive, and its size in mm), and the presence probability and
decision of the prediction. An empty structure has zero volume and null intensities and box.
Sums run over all labels at once (`np.bincount`), medians per label (`scipy.ndimage.median`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mednets.atomic import atomic_write_text

__all__ = ["STATISTICS_COLUMNS", "structure_statistics", "statistics_csv", "write_statistics"]

STATISTICS_COLUMNS = ("structure", "label", "present", "presence_probability", "voxels", "volume_ml",
                      "intensity_mean", "intensity_median", "intensity_std", "intensity_min", "intensity_max",
                      "bbox_start", "bbox_stop", "bbox_size_mm")  # fmt: skip


def structure_statistics(
    labels: np.ndarray,
    image: np.ndarray,
    structures: dict[str, int],
    spacing: tuple[float, ...],
    presence: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Statistics of every structure of `labels`.

    Args:
        labels: label map `[*S]` (uint8 label ids).
        image: the input intensities on the same grid, `[*S]` (or `[*S, C]`: channel 0 is used).
        structures: {name: label id}, background excluded.
        spacing: voxel size in mm in array order.
        presence: the sidecar entries by name (`present`, `probability`), if any.

    Returns:
        {name: {label, present, presence_probability, voxels, volume_ml, intensity_*, bbox_*}}.
    """
    from scipy import ndimage

    values = np.asarray(image)
    if values.ndim == labels.ndim + 1:
        values = values[..., 0]
    values = values.astype(np.float64, copy=False).ravel()
    flat = labels.ravel()
    size = int(max(structures.values(), default=0)) + 1
    flat = np.where(flat < size, flat, 0)  # ids outside the run's structures count as background here
    counts = np.bincount(flat, minlength=size)
    sums = np.bincount(flat, weights=values, minlength=size)
    means = np.divide(sums, counts, out=np.zeros(size), where=counts > 0)
    squares = np.bincount(flat, weights=(values - means[flat]) ** 2, minlength=size)  # two-pass: exact for big HU
    painted = [label for label in structures.values() if counts[label] > 0]
    medians = dict(zip(painted, np.atleast_1d(ndimage.median(values, flat, painted)), strict=True)) if painted else {}
    minimums = dict(zip(painted, np.atleast_1d(ndimage.minimum(values, flat, painted)), strict=True)) if painted else {}
    maximums = dict(zip(painted, np.atleast_1d(ndimage.maximum(values, flat, painted)), strict=True)) if painted else {}
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=size - 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    table: dict[str, dict[str, Any]] = {}
    for name, label in structures.items():
        entry = (presence or {}).get(name, {})
        row: dict[str, Any] = {"label": int(label), "present": entry.get("present"),
                               "presence_probability": entry.get("probability"), "voxels": int(counts[label]),
                               "volume_ml": float(counts[label]) * voxel_ml}  # fmt: skip
        box = boxes[label - 1] if counts[label] else None
        if box is None:
            row.update(dict.fromkeys(STATISTICS_COLUMNS[6:], None))
        else:
            row.update({
                "intensity_mean": float(means[label]),
                "intensity_median": float(medians[label]),
                "intensity_std": float(np.sqrt(squares[label] / counts[label])),
                "intensity_min": float(minimums[label]),
                "intensity_max": float(maximums[label]),
                "bbox_start": [int(s.start) for s in box],
                "bbox_stop": [int(s.stop) - 1 for s in box],
                "bbox_size_mm": [float((s.stop - s.start) * d) for s, d in zip(box, spacing, strict=True)],
            })  # fmt: skip
        table[name] = row
    return table


def statistics_csv(table: dict[str, dict[str, Any]]) -> str:
    """The statistics as CSV text, one row per structure (`STATISTICS_COLUMNS`; boxes as `z y x`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(STATISTICS_COLUMNS)
    for name, row in table.items():
        cells = [name]
        for column in STATISTICS_COLUMNS[1:]:
            value = row.get(column)
            cells.append("" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value)
        writer.writerow(cells)
    return buffer.getvalue()


def write_statistics(
    table: dict[str, dict[str, Any]], json_path: str | os.PathLike[str], csv_path: str | os.PathLike[str]
) -> list[Path]:
    """Write the statistics as JSON and as CSV (each atomically); returns both paths."""
    return [
        atomic_write_text(json_path, json.dumps(table, indent=2)),
        atomic_write_text(csv_path, statistics_csv(table)),
    ]
