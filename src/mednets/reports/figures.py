"""Matplotlib figures shared by the reports, and embedding them as base64 PNG."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are written headless

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from mednets.atomic import atomic_write_bytes

__all__ = ["figure_to_base64", "plot_parameter_breakdown", "plot_data_flow"]


def figure_to_base64(figure: Figure, path: Path | None = None) -> str:
    """Render `figure` as PNG, optionally save it to `path` (atomically), close it, return base64 text."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    data = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return base64.b64encode(data).decode("ascii")


def plot_parameter_breakdown(rows: Sequence[tuple[str, int]], total: int, title: str) -> Figure:
    """Horizontal bars of parameters per component, labelled with count and share."""
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [name for name, _ in rows][::-1]
    counts = [count for _, count in rows][::-1]
    bars = axis.barh(names, [c / 1e6 for c in counts], color="#4c78a8")
    for bar, count in zip(bars, counts, strict=True):
        axis.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f"  {count:,} ({100 * count / total:.1f}%)",
            va="center",
            fontsize=8,
        )
    axis.set_xlabel("parameters (millions)")
    axis.set_title(f"{title}: {total:,} parameters")
    axis.margins(x=0.35)
    return figure


def _spatial(shape: Any) -> tuple[int, ...] | None:
    """Spatial size of a stage output: the tensor's axes after [B, C], or the first tensor of a dict/list."""
    if isinstance(shape, tuple):
        return shape[2:] if len(shape) > 2 else None
    items = shape.values() if isinstance(shape, dict) else shape if isinstance(shape, list) else ()
    return next((s for s in (_spatial(item) for item in items) if s), None)


def _channels(shape: Any) -> str:
    if isinstance(shape, tuple) and len(shape) > 1:
        return str(shape[1])
    return "..."


def plot_data_flow(stages: Sequence[tuple[str, Any]], input_shape: tuple[int, ...], title: str) -> Figure:
    """The data-flow map: each stage a box at its resolution level (deeper = lower), in call order.

    A U-Net draws as a U: encoder stages step down, decoder stages step back up.
    """
    base = input_shape[2]
    points = []
    for index, (name, shape) in enumerate(stages):
        spatial = _spatial(shape)
        level = math.log2(base / spatial[0]) if spatial and spatial[0] else 0.0
        label = f"{name}\n{_channels(shape)} x {'x'.join(map(str, spatial)) if spatial else '-'}"
        points.append((index + 1, -level, label))
    figure, axis = plt.subplots(figsize=(max(6, 1.25 * (len(points) + 1)), 4))
    xs = [0] + [p[0] for p in points]
    ys = [0.0] + [p[1] for p in points]
    axis.plot(xs, ys, "-", color="#999", zorder=1)
    input_label = f"input\n{input_shape[1]} x {'x'.join(map(str, input_shape[2:]))}"
    for x, y, label in [(0, 0.0, input_label), *points]:
        axis.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=7,
            bbox=dict(boxstyle="round", facecolor="#e8eef6", edgecolor="#4c78a8"),
            zorder=2,
        )
    axis.set_xlim(-0.8, len(points) + 0.8)
    axis.set_ylim(min(ys) - 0.8, 0.8)
    axis.set_yticks(sorted(set(ys)))
    axis.set_yticklabels([f"1/{2 ** round(-y)}" for y in sorted(set(ys))])
    axis.set_ylabel("resolution (of input)")
    axis.set_xticks([])
    axis.set_title(f"{title}: data flow (channels x spatial size per stage)")
    return figure
