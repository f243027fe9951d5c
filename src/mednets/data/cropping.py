"""The region of a scan worth computing on: the body (CT) or the non-zero region, and the labels.

nnU-Net crops every case to its non-zero region; CT air is -1000 HU, not 0, so for CT channels the
body is what is denser than -500 HU. The box is found on every second voxel (a scan is large) and
grown by that stride, and always holds every labelled voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BODY_HU", "Box", "body_box"]

BODY_HU = -500.0
_STRIDE = 2

Box = tuple[tuple[int, int], ...]  # (start, stop) per spatial axis


def _box_of(mask: np.ndarray, scale: int, shape: Sequence[int]) -> Box | None:
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append((max(0, int(hits[0]) * scale - scale), min(shape[axis], (int(hits[-1]) + 2) * scale)))
    return tuple(box)


def body_box(channels: Sequence[np.ndarray], schemes: Sequence[str], labels: np.ndarray | None = None) -> Box:
    """The box of the body (CT channels: > -500 HU; others: non-zero) united with the labels' box.

    Args:
        channels: the image channels, each `[*S]` as stored (HU for CT).
        schemes: each channel's normalisation scheme (`mednets.data.intensity`); ``ct`` and ``window``
            channels are HU.
        labels: the label map `[*S]`, or None.

    Returns:
        ((start, stop), ...) per axis; the whole scan when nothing stands out (a uniform image).
    """
    shape = channels[0].shape
    step = tuple(slice(None, None, _STRIDE) for _ in shape)
    mask = np.zeros([len(range(0, n, _STRIDE)) for n in shape], dtype=bool)
    for channel, scheme in zip(channels, schemes, strict=True):
        coarse = channel[step]
        mask |= coarse > BODY_HU if scheme in ("ct", "window") else coarse != 0
    if mask.all():
        mask[:] = False  # nothing stands out: no crop
    boxes = [_box_of(mask, _STRIDE, shape)]
    if labels is not None:
        boxes.append(_box_of(labels > 0, 1, shape))
    found = [box for box in boxes if box is not None]
    if not found:
        return tuple((0, n) for n in shape)
    return tuple((min(b[a][0] for b in found), max(b[a][1] for b in found)) for a in range(len(shape)))
