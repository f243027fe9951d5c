"""The one sliding-window blender: a model over overlapping windows of an image of any size, 2D or 3D.

Two weightings, one loop:

- ``"gaussian"`` (segmentation): MONAI's ``sliding_window_inference(mode="gaussian")``, equal to it
  within float rounding in fp32 (tested): stride ``int(patch * (1 - overlap))``, the last window flush
  with the far edge, MONAI's importance map; axes shorter than the patch are padded (centred, with
  `pad_value`) and cropped back.
- ``"seamless"`` (image-to-image models such as the denoising autoencoders): windows of the patch size
  (rounded up to the model's `size_multiple`, shrunk to small images) overlap by ``round(overlap *
  patch)`` pixels; each window's weight is 0 within a margin of a quarter of the overlap at an edge it
  shares with a neighbour (where the model saw padding, not the image), rises as sin² over the rest of
  the overlap and is 1 elsewhere. Neighbours' ramps add up to exactly 1, so a model whose receptive
  field ends within the margin gives the same output as on the whole image. Sides are reflect-padded
  to whole multiples and cropped back.

What makes it fast on a CPU (and lean on a GPU): windows run in batches, in bf16 autocast and
``channels_last(_3d)``, inside one autocast context (weights cast once per call); each window's
weighted output is added in place into its slice of the output (``addcmul_``); freed activations stay
in the process for the next layer (`reuse_freed_memory`). Kept hand-written rather than MONAI's
inferer because it is measured faster at equal settings (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from torch import nn
from tqdm.auto import tqdm

from mednets.devices import resolve_device
from mednets.errors import ConfigError, InvalidInputError
from mednets.host_memory import reuse_freed_memory

__all__ = ["WEIGHTINGS", "importance_map", "seamless_window", "sliding_window", "window_starts"]

WEIGHTINGS = ("gaussian", "seamless")


@functools.lru_cache(maxsize=16)
def importance_map(patch: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """MONAI's gaussian importance map ``[*patch]`` (`compute_importance_map`: sigma ``sigma_scale * patch``,
    peak in the middle, clamped below at 1e-3 so every voxel of a window counts), computed once per patch size."""
    weights = compute_importance_map(patch, mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    return weights.float().clamp_min(max(float(weights.min()), 1e-3))


def _starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, length)`` every `stride`; the last one ends at `length`."""
    if length <= patch:
        return [0]
    return [*range(0, length - patch, stride), length - patch]


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Window starts on one axis: stride ``max(1, int(patch * (1 - overlap)))`` (MONAI's), the last flush with the end."""
    return _starts(length, patch, max(1, int(patch * (1 - overlap))))


def seamless_window(size: int, margin: int, ramp: int, *, first: bool, last: bool) -> torch.Tensor:
    """1D seamless weights `[size]`: 0 over `margin`, sin² over `ramp`, then 1, on each edge shared with a neighbour.

    Args:
        size: window length.
        margin: pixels at a shared edge that get no weight.
        ramp: length of the rise after the margin.
        first: the window starts at the image edge (no ramp at its start).
        last: the window ends at the image edge (no ramp at its end).
    """
    distance = torch.arange(size, dtype=torch.float64) + 0.5  # pixel centres from the start edge
    weights = torch.ones(size, dtype=torch.float64)
    for edge_distance, at_image_edge in ((distance, first), (size - distance, last)):
        if at_image_edge:
            continue
        rise = ((edge_distance - margin) / max(ramp, 1)).clamp(0.0, 1.0)
        weights = weights * torch.sin(rise * math.pi / 2) ** 2
    return weights.float()


def _pad(image: torch.Tensor, before: Sequence[int], after: Sequence[int], mode: str, value: float) -> torch.Tensor:
    """Pad the spatial axes of ``[C, *S]`` (F.pad takes the last axis first)."""
    if not any(before) and not any(after):
        return image
    widths = [w for b, a in zip(reversed(before), reversed(after), strict=True) for w in (b, a)]
    if mode == "constant":
        return F.pad(image[None], widths, value=value)[0]
    mode = "reflect" if all(a < n for a, n in zip(after, image.shape[1:], strict=True)) else "replicate"
    return F.pad(image[None].float(), widths, mode=mode)[0].to(image.dtype)


def sliding_window(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    weights: str = "gaussian",
    batch_size: int = 2,
    sigma_scale: float = 0.125,
    size_multiple: int = 1,
    precision: str = "bf16",
    channels_last: bool = True,
    accumulate_device: torch.device | str | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    pad_value: float = 0.0,
    progress: bool = False,
) -> torch.Tensor:
    """Blend the model's outputs over overlapping windows of `image`.

    Args:
        model: maps ``[B, C, *patch]`` to ``[B, K, *patch]`` (eval mode; on the device it should run on).
        image: ``[C, *spatial]`` (2 or 3 spatial axes), any device: windows move to the model's device.
        patch_size: window size, one per spatial axis.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        weights: "gaussian" or "seamless" (module docstring).
        batch_size: windows per forward pass.
        sigma_scale: gaussian sigma as a fraction of the patch.
        size_multiple: seamless windows' sides are multiples of this (the model's `size_multiple`).
        precision: "bf16" (autocast) or "fp32".
        channels_last: feed windows in ``channels_last`` / ``channels_last_3d`` memory format.
        accumulate_device: where the full-size output lives (default: the image's device); a GPU model
            with a CPU accumulator handles volumes larger than GPU memory.
        accumulate_dtype: dtype of the blended output (float32; bfloat16 or float16 halve its memory,
            ``K`` x the volume, at the cost of rounding in the sums).
        pad_value: fill for axes shorter than a gaussian window.
        progress: show a progress bar over the batches.

    Returns:
        ``[K, *spatial]`` of `accumulate_dtype` on `accumulate_device`: the weighted mean of the window outputs.

    Raises:
        ConfigError: bad overlap, weights, batch size, precision or patch size; InvalidInputError: bad image.
    """
    spatial = tuple(image.shape[1:])
    if image.ndim not in (3, 4) or len(patch_size) != len(spatial):
        raise InvalidInputError("expected an image [C, *spatial] with one patch size per spatial axis",
                                source="image", got={"image": tuple(image.shape), "patch_size": tuple(patch_size)})  # fmt: skip
    if (not 0.0 <= overlap < 1.0 or batch_size < 1 or precision not in ("bf16", "fp32") or min(patch_size) < 1
            or weights not in WEIGHTINGS or size_multiple < 1):  # fmt: skip
        raise ConfigError("sliding window: need 0 <= overlap < 1, batch_size >= 1, precision bf16 or fp32, "
                          f"weights one of {WEIGHTINGS}", source="sliding_window",
                          got={"overlap": overlap, "batch_size": batch_size, "precision": precision,
                               "patch_size": tuple(patch_size), "weights": weights})  # fmt: skip
    if weights == "gaussian":
        patch = [int(p) for p in patch_size]
        pads = [max(0, p - n) for p, n in zip(patch, spatial, strict=True)]
        before = [pad // 2 for pad in pads]
        image = _pad(image, before, [pad - b for pad, b in zip(pads, before, strict=True)], "constant", pad_value)
        starts = [window_starts(n, p, overlap) for n, p in zip(image.shape[1:], patch, strict=True)]
    else:

        def whole(n: int) -> int:
            return math.ceil(n / size_multiple) * size_multiple

        patch = [min(whole(p), whole(n)) for p, n in zip(patch_size, spatial, strict=True)]
        before = [0] * len(spatial)
        image = _pad(image, before, [max(n, p) - n for n, p in zip(spatial, patch, strict=True)], "reflect", 0.0)
        overlaps = [max(1, round(overlap * p)) if overlap > 0 else 0 for p in patch]
        starts = [_starts(n, p, max(1, p - o)) for n, p, o in zip(image.shape[1:], patch, overlaps, strict=True)]
    padded = tuple(image.shape[1:])
    corners = list(itertools.product(*starts))
    device = _model_device(model, image)
    target = (
        image.device if accumulate_device is None else resolve_device(accumulate_device, source="accumulate_device")
    )
    window_weights = _window_weights(weights, patch, padded, overlaps if weights == "seamless" else None,
                                     sigma_scale, target)  # fmt: skip
    weight_sum = torch.zeros(padded, device=target)
    memory_format = {3: torch.channels_last, 4: torch.channels_last_3d}[image.ndim] if channels_last else None
    source = image.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    output: torch.Tensor | None = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    batches = range(0, len(corners), batch_size)
    with torch.no_grad(), autocast, reuse_freed_memory():
        for first in tqdm(batches, desc="windows", unit="batch", disable=not progress, leave=False):
            batch = corners[first : first + batch_size]
            windows = torch.stack([source[(slice(None), *_slices(c, patch))] for c in batch])
            if memory_format is not None:
                windows = windows.contiguous(memory_format=memory_format)
            logits = model(windows)
            if not isinstance(logits, torch.Tensor):
                raise InvalidInputError("sliding-window models must return one tensor",
                                        source="model", got=type(logits).__name__)  # fmt: skip
            logits = logits.to(device=target, dtype=accumulate_dtype, memory_format=torch.contiguous_format)
            if output is None:
                output = torch.zeros((logits.shape[1], *padded), device=target, dtype=accumulate_dtype)
            for window_logits, corner in zip(logits, batch, strict=True):
                region = _slices(corner, patch)
                importance = window_weights(corner)
                output[(slice(None), *region)].addcmul_(window_logits, importance.to(accumulate_dtype))
                weight_sum[region] += importance
    assert output is not None  # at least one window always runs
    output.div_(weight_sum.clamp_min(1e-12))
    crop = tuple(slice(b, b + n) for b, n in zip(before, spatial, strict=True))
    return output[(slice(None), *crop)] if padded != spatial else output


def _window_weights(
    weights: str,
    patch: Sequence[int],
    padded: Sequence[int],
    overlaps: Sequence[int] | None,
    sigma_scale: float,
    device: torch.device,
) -> Callable[[Sequence[int]], torch.Tensor]:
    """The weights ``[*patch]`` of the window at a corner: one gaussian map, or seamless ramps by the window's edges."""
    if weights == "gaussian":
        gaussian = importance_map(tuple(patch), sigma_scale).to(device)
        return lambda corner: gaussian

    @functools.lru_cache(maxsize=64)
    def seamless(edges: tuple[tuple[bool, bool], ...]) -> torch.Tensor:
        result = torch.ones((), device=device)
        for axis, ((first, last), size, shared) in enumerate(zip(edges, patch, overlaps, strict=True)):
            margin = shared // 4
            ramp = seamless_window(size, margin, shared - 2 * margin, first=first, last=last).to(device)
            result = result.unsqueeze(-1) * ramp.view(*([1] * axis), size)
        return result

    return lambda corner: seamless(tuple((c == 0, c + p == n) for c, p, n in zip(corner, patch, padded, strict=True)))


def _model_device(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.device:
    """The device of the model's first parameter; the image's for parameterless callables."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return image.device


def _slices(corner: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(start, start + p) for start, p in zip(corner, patch, strict=True))
