"""Per-structure statistics of a label map, as TotalSegmentator's `statistics.json` plus presence.

Per structure: voxels, volume (mL), intensity mean / median / std / min / max of the input image
inside it (HU for CT; the first channel of a multi-channel image), bounding box (voxel indices in
array order, first and last inclusive, and its size in mm), and the presence probability and
decision of the prediction. An empty structure has zero volume and null intensities and box.
Only the structures' voxels are gathered (sorted by label once), so the cost follows their volume,
not the scan's.
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
    size = int(max(structures.values(), default=0)) + 1
    flat = labels.ravel()
    positions = np.flatnonzero((flat > 0) & (flat < size))  # only the structures' voxels: a few % of a CT
    ids = flat[positions]
    order = np.argsort(ids, kind="stable")
    positions, ids = positions[order], ids[order]
    values = np.asarray(image)
    if values.ndim == labels.ndim + 1:
        values = values[..., 0]
    values = values.ravel()[positions].astype(np.float64)
    bounds = np.searchsorted(ids, np.arange(size + 1))  # structure `label` is [bounds[label], bounds[label + 1])
    voxel_ml = float(np.prod(spacing)) / 1000.0
    table: dict[str, dict[str, Any]] = {}
    for name, label in structures.items():
        entry = (presence or {}).get(name, {})
        start, stop = int(bounds[label]), int(bounds[label + 1])
        row: dict[str, Any] = {"label": int(label), "present": entry.get("present"),
                               "presence_probability": entry.get("probability"), "voxels": stop - start,
                               "volume_ml": (stop - start) * voxel_ml}  # fmt: skip
        if stop == start:
            row.update(dict.fromkeys(STATISTICS_COLUMNS[6:], None))
        else:
            inside = values[start:stop]
            where = np.unravel_index(positions[start:stop], labels.shape)
            first, last = [int(axis.min()) for axis in where], [int(axis.max()) for axis in where]
            row.update({
                "intensity_mean": float(inside.mean()),
                "intensity_median": float(np.median(inside)),
                "intensity_std": float(inside.std()),
                "intensity_min": float(inside.min()),
                "intensity_max": float(inside.max()),
                "bbox_start": first,
                "bbox_stop": last,
                "bbox_size_mm": [float((b - a + 1) * d) for a, b, d in zip(first, last, spacing, strict=True)],
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
