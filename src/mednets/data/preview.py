"""Pictures of volumes: three orthogonal slices with the labels overlaid and a legend by organ name.

Volumes are shown in the radiological convention whatever their orientation on disk (they are
reoriented to LPS first): axial with the patient's right on the image left and anterior at the top,
coronal and sagittal with the head at the top.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from mednets import anatomy
from mednets.atomic import atomic_write_bytes, check_not_inputs
from mednets.data.io import read_volume
from mednets.data.segmentation_files import read_seg_nrrd
from mednets.data.volume import Volume
from mednets.errors import InvalidInputError

__all__ = ["DEFAULT_WINDOW", "label_colours", "render_orthogonal", "show"]

DEFAULT_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window (level 40, width 400 HU)


def label_colours(
    label_ids: list[int], structures: dict[str, int] | None = None
) -> dict[int, tuple[str, tuple[float, float, float]]]:
    """{id: (name, RGB)}: by the dataset's `structures` ({name: id}) when given (`anatomy.describe_structures`),
    else registry organs by id; other ids a tab20 colour."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    named = {s.label: (s.display, s.color) for s in anatomy.describe_structures(structures)} if structures else {}
    out = {}
    for label_id in label_ids:
        if label_id in named:
            out[label_id] = named[label_id]
            continue
        try:
            o = anatomy.organ_by_id(label_id)
            out[label_id] = (o.display, o.color)
        except Exception:
            out[label_id] = (f"label {label_id}", tuple(palette(label_id % 20)[:3]))
    return out


def _centre(labels: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if labels is not None and labels.any():
        # The slices through the labels' centre of mass show the most structures at once.
        return tuple(round(float(c)) for c in np.argwhere(labels > 0).mean(axis=0))  # type: ignore[return-value]
    return tuple(n // 2 for n in shape)  # type: ignore[return-value]


def render_orthogonal(
    volume: Volume,
    labels: Volume | None = None,
    *,
    window: tuple[float, float] = DEFAULT_WINDOW,
    title: str | None = None,
    alpha: float = 0.45,
    legend: dict[int, tuple[str, tuple[float, float, float]]] | None = None,
) -> bytes:
    """PNG bytes of axial, coronal and sagittal slices of `volume`, `labels` overlaid with a legend.

    Args:
        volume: a 3D `Volume` (any orientation).
        labels: a label map on the same grid, or None.
        window: display window (low, high) in the volume's units (HU for CT).
        title: figure title.
        alpha: overlay opacity.
        legend: {label: (name, RGB)} to use (a `.seg.nrrd`'s own names and colours); default `label_colours`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if volume.channel_axis is not None or volume.array.ndim != 3:
        raise InvalidInputError(
            "show needs a 3D single-channel volume", source=volume.meta.get("source"), got=volume.array.shape
        )
    image = volume.reoriented("LPS")
    label_array = None
    if labels is not None:
        if labels.array.shape != volume.array.shape:
            raise InvalidInputError(
                "labels do not match the image grid",
                source=labels.meta.get("source"),
                expected=volume.array.shape,
                got=labels.array.shape,
            )
        label_array = labels.reoriented("LPS").array.astype(np.int64)
    sz, sy, sx = image.spacing
    k, j, i = _centre(label_array, image.array.shape)
    views = [
        ("axial", image.array[k], None if label_array is None else label_array[k], sy / sx, "upper"),
        ("coronal", image.array[:, j, :], None if label_array is None else label_array[:, j, :], sz / sx, "lower"),
        ("sagittal", image.array[:, :, i], None if label_array is None else label_array[:, :, i], sz / sy, "lower"),
    ]
    present = sorted(int(v) for v in np.unique(label_array) if v != 0) if label_array is not None else []
    colours = {**label_colours(present), **{k: v for k, v in (legend or {}).items() if k in present}}
    lut = np.zeros((max(present, default=0) + 1, 4))
    for label_id, (_, rgb) in colours.items():
        lut[label_id] = (*rgb, alpha)

    figure, axes = plt.subplots(1, 3, figsize=(13, 5.2))
    for axis, (name, slice_, label_slice, aspect, origin) in zip(axes, views, strict=True):
        axis.imshow(
            slice_, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, origin=origin, interpolation="nearest"
        )
        if label_slice is not None and present:
            axis.imshow(lut[label_slice], aspect=aspect, origin=origin, interpolation="nearest")
        axis.set_title(name)
        axis.set_axis_off()
    if present:
        handles = [Patch(color=colours[c][1], label=colours[c][0]) for c in present]
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    figure.suptitle(title or str(volume.meta.get("source", "")), fontsize=10)
    figure.tight_layout(rect=(0, 0.1 if present else 0, 1, 0.95))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def show(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW,
) -> Path:
    """Read `path` (and `labels`), render three orthogonal slices with the overlay, write PNG `out` atomically.

    A `.seg.nrrd` label map is shown with the segment names and colours its header gives.
    """
    check_not_inputs([out], [path, labels], "--out")
    volume = read_volume(path)
    label_volume, legend = None, None
    if labels is not None and str(labels).lower().endswith(".seg.nrrd"):
        label_volume, segments = read_seg_nrrd(labels)
        legend = {int(s["label"]): (str(s["name"]), tuple(s["color"])) for s in segments}
    elif labels is not None:
        label_volume = read_volume(labels)
        dataset_json = Path(labels).resolve().parent.parent / "dataset.json"  # a dataset folder's labelsTr/
        if dataset_json.is_file():
            names = json.loads(dataset_json.read_text(encoding="utf-8")).get("labels", {})
            structures = {str(k): int(v) for k, v in names.items() if int(v) != 0}
            legend = label_colours(sorted(structures.values()), structures)
    data = render_orthogonal(volume, label_volume, window=window, title=Path(path).name, legend=legend)
    return atomic_write_bytes(out, data)
