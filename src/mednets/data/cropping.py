"""The region of a scan worth computing on (the body, or the non-zero region, and the labels), and windows of arrays.

nnU-Net crops every case to its non-zero region; CT air is -1000 HU, not 0, so for CT channels the
body is what is denser than -500 HU. The box is found on every second voxel (a scan is large) and
grown by that stride, and always holds every labelled voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BODY_HU", "Box", "body_box", "centre_pad_crop", "centre_start", "window"]

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


def window(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float | Sequence[float]) -> np.ndarray:
    """The `size` window of `array` at `start`; where it lies outside the array it holds `fill`.

    `array` is `[C, *S]` or `[*S]` (the spatial axes are the last `len(size)`); `fill` is one value, or
    one per channel. A negative start pads before the array.
    """
    lead = array.shape[: array.ndim - len(size)]
    out = np.empty((*lead, *size), dtype=array.dtype)
    out[...] = np.broadcast_to(np.asarray(fill, dtype=array.dtype), lead or (1,)).reshape(*lead, *([1] * len(size)))
    source, target = [], []
    for begin, n, total in zip(start, size, array.shape[len(lead) :], strict=True):
        low, high = max(begin, 0), min(begin + n, total)
        source.append(slice(low, max(low, high)))
        target.append(slice(low - begin, low - begin + max(0, high - low)))
    out[(..., *target)] = array[(..., *source)]
    return out


def centre_start(shape: Sequence[int], size: Sequence[int]) -> list[int]:
    """Start of the `size` window centred on an array of `shape` (negative on axes where the window is larger).

    `window(window(a, start, size, f), [-s for s in start], shape, g)` gives `a` back where the
    window held it (and `g` where it was cropped away).
    """
    return [(n - g) // 2 if n > g else -((g - n) // 2) for n, g in zip(shape, size, strict=True)]


def centre_pad_crop(array: np.ndarray, size: Sequence[int], fill: float | Sequence[float]) -> np.ndarray:
    """Centre-pad (with `fill`) or centre-crop `[C, *S]` or `[*S]` to `size` (the spatial axes are the last)."""
    return window(array, centre_start(array.shape[array.ndim - len(size) :], size), size, fill)
