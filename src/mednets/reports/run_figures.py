"""Matplotlib figures of the run report: curves, per-organ Dice, presence, absent-organ volume, slice overlays.

Each function takes plain data (lists, arrays) and returns a `Figure`; `figures.figure_to_base64`
embeds it. Volumes are arrays in LPS order `[D, H, W]` = `[z, y, x]` (`Volume.reoriented("LPS")`):
axial slices are shown with the patient's right on the image left and anterior at the top, coronal
slices with the head at the top (the radiological convention, as `mednets show`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # reports are written headless

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mednets.data.preview import DEFAULT_WINDOW, label_colours

__all__ = [
    "plot_training_curves",
    "plot_dice_per_structure",
    "plot_presence_confusion",
    "plot_calibration",
    "plot_absent_false_positives",
    "plot_case_overlay",
]

_BLUE, _ORANGE, _GREEN, _RED, _GREY = "#4c78a8", "#f58518", "#54a24b", "#e45756", "#9d9d9d"


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is)."""
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, values.size + 1) - window, 0)]) / counts


def plot_training_curves(
    train: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    validation: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    best_step: float | None = None,
) -> Figure:
    """Training loss terms (left, log scale, smoothed) and validation metrics (right) against the step.

    Args:
        train: `{term: (steps, values)}`, e.g. `{"total": ...}`; "total" is drawn bold.
        validation: `{metric: (steps, values)}`; "loss" goes on its own right-hand axis.
        best_step: the step of the best checkpoint, marked on both panels.
    """
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    palette = plt.get_cmap("tab10")
    window = max(1, max((len(values) for _, values in train.values()), default=0) // 40)
    for index, (term, (steps, values)) in enumerate(sorted(train.items(), key=lambda item: item[0] != "total")):
        steps_array, values_array = np.asarray(steps, float), np.asarray(values, float)
        if term == "total":
            left.plot(steps_array, values_array, color=_BLUE, alpha=0.25, linewidth=0.8)
            left.plot(steps_array, _smoothed(values_array, window), color=_BLUE, linewidth=2, label="total")
        else:
            left.plot(steps_array, _smoothed(values_array, window), color=palette(index % 10), linewidth=1, label=term)
    if any(np.nanmin(np.asarray(v, float)) > 0 for _, v in train.values() if len(v)):
        left.set_yscale("log")
    left.set_title(f"training loss terms (moving average over {window} steps)")
    left.set_xlabel("step")
    left.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    left.grid(alpha=0.3)
    loss_axis = None
    for index, (metric, (steps, values)) in enumerate(validation.items()):
        if metric == "loss":
            loss_axis = right.twinx()
            loss_axis.plot(steps, values, "--", color=_GREY, marker=".", label="loss (right axis)")
            loss_axis.set_ylabel("validation loss")
        else:
            right.plot(steps, values, marker="o", markersize=3, color=palette(index % 10), label=metric)
    right.set_ylim(-0.02, 1.02)
    right.set_title("validation")
    right.set_xlabel("step")
    right.grid(alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    if loss_axis is not None:
        more_handles, more_labels = loss_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if best_step is not None:
        for axis in (left, right):
            axis.axvline(best_step, color=_GREEN, linewidth=1, linestyle=":")
        handles.append(plt.Line2D([], [], color=_GREEN, linestyle=":"))
        labels.append(f"best checkpoint (step {best_step:.0f})")
    right.legend(handles, labels, fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def plot_dice_per_structure(dice: Mapping[str, float | None]) -> Figure:
    """Horizontal bars of the mean Dice per structure (present cases only); "n/a" where never present."""
    names = list(dice)[::-1]
    values = [dice[name] for name in names]
    figure, axis = plt.subplots(figsize=(5.4, 0.3 * len(names) + 1.0))
    bars = axis.barh(names, [0.0 if v is None else v for v in values], color=_BLUE)
    for bar, value in zip(bars, values, strict=True):
        text = "n/a" if value is None else f"{value:.3f}"
        axis.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    axis.set_xlim(0, 1.12)
    axis.set_xlabel("Dice (cases where the organ is present)")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def plot_presence_confusion(counts: np.ndarray) -> Figure:
    """The 2x2 presence confusion matrix: `counts[truth, decision]`, index 0 = present, 1 = absent."""
    figure, axis = plt.subplots(figsize=(3.8, 3.4))
    share = counts / max(counts.sum(), 1)
    axis.imshow(share, cmap="Blues", vmin=0, vmax=max(float(share.max()), 1e-9))
    for row in range(2):
        for column in range(2):
            dark = share[row, column] > 0.5 * share.max()
            axis.text(
                column,
                row,
                f"{int(counts[row, column])}",
                ha="center",
                va="center",
                fontsize=14,
                color="white" if dark else "black",
            )
    axis.set_xticks([0, 1], ["present", "absent"])
    axis.set_yticks([0, 1], ["present", "absent"])
    axis.set_xlabel("predicted")
    axis.set_ylabel("truth")
    axis.set_title("organ presence (organ-cases)", fontsize=10)
    figure.tight_layout()
    return figure


def plot_calibration(probabilities: Sequence[float], present: Sequence[bool], *, bins: int = 10) -> Figure:
    """Reliability diagram of presence probabilities (top) and their histogram by truth (bottom)."""
    p = np.asarray(probabilities, float)
    y = np.asarray(present, bool)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(4.6, 5.2), height_ratios=[3, 1.4], sharex=True)
    top.plot([0, 1], [0, 1], color=_GREY, linestyle=":", label="perfect calibration")
    centres, observed, sizes = [], [], []
    for b in range(bins):
        members = index == b
        if members.any():
            centres.append(float(p[members].mean()))
            observed.append(float(y[members].mean()))
            sizes.append(int(members.sum()))
    top.plot(centres, observed, marker="o", color=_BLUE, label="observed share present")
    for x, v, n in zip(centres, observed, sizes, strict=True):
        top.annotate(str(n), (x, v), textcoords="offset points", xytext=(4, -10), fontsize=7, color=_GREY)
    top.set_ylim(-0.03, 1.03)
    top.set_ylabel("share truly present")
    top.set_title("presence calibration (numbers: organ-cases per bin)", fontsize=10)
    top.legend(fontsize=7, loc="upper left")
    top.grid(alpha=0.3)
    bottom.hist([p[y], p[~y]], bins=edges, color=[_BLUE, _RED], label=["present", "absent"], stacked=True)
    bottom.set_yscale("symlog")
    bottom.set_xlabel("presence probability")
    bottom.set_ylabel("count")
    bottom.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def plot_absent_false_positives(entries: Sequence[tuple[str, str, float]]) -> Figure:
    """False-positive volume (mL) painted on each absent organ-case, coloured by scenario.

    Args:
        entries: `(label, scenario, false_positive_ml)` per absent organ-case.
    """
    scenarios = list(dict.fromkeys(scenario for _, scenario, _ in entries))
    palette = plt.get_cmap("tab10")
    colour = {scenario: palette(i % 10) for i, scenario in enumerate(scenarios)}
    figure, axis = plt.subplots(figsize=(7, 0.3 * len(entries) + 1.6))
    labels = [label for label, _, _ in entries][::-1]
    values = [value for _, _, value in entries][::-1]
    bars = axis.barh(labels, values, color=[colour[s] for _, s, _ in entries][::-1])
    top = max(values, default=0.0)
    for bar, value in zip(bars, values, strict=True):
        axis.text(
            bar.get_width() + 0.01 * max(top, 1e-9),
            bar.get_y() + bar.get_height() / 2,
            f"{value:.2f} mL",
            va="center",
            fontsize=7,
        )
    axis.set_xlim(0, top * 1.25 if top > 0 else 1.0)
    axis.set_xlabel("false-positive volume painted on the absent organ (mL)")
    axis.tick_params(axis="y", labelsize=7)
    axis.legend(handles=[Patch(color=colour[s], label=s) for s in scenarios], fontsize=7, loc="lower right")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def plot_case_overlay(
    image: np.ndarray,
    truth: np.ndarray | None,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    point: Sequence[int],
    *,
    window: tuple[float, float] = DEFAULT_WINDOW,
    alpha: float = 0.5,
    structures: dict[str, int] | None = None,
) -> Figure:
    """Axial and coronal slices through `point`: image, truth overlay, prediction overlay (2 x 3 panels).

    Args:
        image: `[D, H, W]` in HU, LPS order.
        truth: `[D, H, W]` label map, or None (its column then says so).
        prediction: `[D, H, W]` label map.
        spacing_mm: voxel size `(D, H, W)` in mm.
        point: `(d, h, w)` index the slices go through.
        window: display window in HU.
        alpha: overlay opacity.
    """
    sz, sy, sx = spacing_mm
    k, j, _ = (int(np.clip(c, 0, n - 1)) for c, n in zip(point, image.shape, strict=True))
    maps = [("image", None), ("truth", truth), ("prediction", prediction)]
    ids = sorted({int(v) for _, m in maps if m is not None for v in np.unique(m) if v})
    colours = label_colours(ids, structures)
    lut = np.zeros((max(ids, default=0) + 1, 4))
    for label_id, (_, rgb) in colours.items():
        lut[label_id] = (*rgb, alpha)
    views = [("axial", lambda a: a[k], sy / sx, "upper"), ("coronal", lambda a: a[:, j, :], sz / sx, "lower")]
    figure, axes = plt.subplots(2, 3, figsize=(8.4, 6.4), layout="constrained")
    for row, (view, cut, aspect, origin) in enumerate(views):
        for column, (name, labels) in enumerate(maps):
            axis = axes[row, column]
            grey = {"cmap": "gray", "vmin": window[0], "vmax": window[1]}
            axis.imshow(cut(image), **grey, aspect=aspect, origin=origin, interpolation="nearest")
            if labels is not None and ids:
                axis.imshow(lut[cut(labels)], aspect=aspect, origin=origin, interpolation="nearest")
            elif column and labels is None:
                axis.text(0.5, 0.5, "no truth", transform=axis.transAxes, ha="center", color="white")
            axis.set_title(f"{name}, {view} slice {k if view == 'axial' else j}", fontsize=9)
            axis.set_axis_off()
    if ids:
        handles = [Patch(color=colours[c][1], label=colours[c][0]) for c in ids]
        figure.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    return figure
