"""Gaussian-blended sliding-window inference over volumes larger than a network's patch.

What makes it fast on a CPU (and keeps it lean on a GPU):
- windows run in batches, in bf16 autocast, in ``channels_last_3d`` (the layout oneDNN's AMX/AVX-512
  bf16 kernels want), inside one autocast context, so the weights are cast to bf16 once per call;
- the gaussian importance map is computed once per patch size (cached);
- each window's weighted logits are added in place into its slice of the output (``addcmul_``), with
  no copy of the whole volume per window; the weights are summed in one single-channel map and the
  output divided by it in place at the end;
- freed activations stay in the process for the next layer instead of going back to the kernel
  (`reuse_freed_memory`): no page faults on every layer's output.

The windows and their blending are MONAI's ``sliding_window_inference(mode="gaussian")`` (equal to it
within float rounding in fp32, tested): stride ``int(patch * (1 - overlap))``, the last window on each
axis flush with the far edge, MONAI's importance map; axes shorter than the patch are padded (with
`pad_value`, centred) and cropped back.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from torch import nn
from tqdm.auto import tqdm

from mednets.engine.host_memory import reuse_freed_memory
from mednets.engine.tiling import tile_starts
from mednets.errors import ConfigError, InvalidInputError

__all__ = ["importance_map", "sliding_window_logits", "window_starts"]


@functools.lru_cache(maxsize=16)
def importance_map(patch: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """MONAI's gaussian importance map ``[*patch]`` (`compute_importance_map`: sigma ``sigma_scale * patch``,
    peak in the middle, clamped below at 1e-3 so every voxel of a window counts), computed once per patch size."""
    weights = compute_importance_map(patch, mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    return weights.float().clamp_min(max(float(weights.min()), 1e-3))


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Window starts on one axis: stride ``max(1, int(patch * (1 - overlap)))`` (MONAI's), the last flush with the end."""
    return tile_starts(length, patch, max(1, int(patch * (1 - overlap))))


def sliding_window_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 0.125,
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
        image: ``[C, D, H, W]`` (or ``[C, H, W]``), any device: windows are moved to the model's device.
        patch_size: window size, one per spatial axis.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
        sigma_scale: gaussian sigma as a fraction of the patch.
        precision: "bf16" (autocast) or "fp32".
        channels_last: feed windows in ``channels_last_3d`` / ``channels_last`` memory format.
        accumulate_device: where the full-size output lives (default: the image's device); a GPU model
            with a CPU accumulator handles volumes larger than GPU memory.
        accumulate_dtype: dtype of the blended output (float32; bfloat16 or float16 halve its memory,
            ``K`` x the volume, at the cost of rounding in the sums).
        pad_value: fill for axes shorter than the patch.
        progress: show a progress bar over the batches.

    Returns:
        ``[K, *spatial]`` of `accumulate_dtype` on `accumulate_device`: the weighted mean of the window outputs.

    Raises:
        ConfigError: bad overlap, batch size, precision or patch size; InvalidInputError: bad image.
    """
    spatial = image.shape[1:]
    if image.ndim not in (3, 4) or len(patch_size) != len(spatial):
        raise InvalidInputError("expected an image [C, *spatial] with one patch size per spatial axis",
                                source="image", got={"image": tuple(image.shape), "patch_size": tuple(patch_size)})  # fmt: skip
    if not 0.0 <= overlap < 1.0 or batch_size < 1 or precision not in ("bf16", "fp32") or min(patch_size) < 1:
        raise ConfigError("sliding window: need 0 <= overlap < 1, batch_size >= 1, precision bf16 or fp32",
                          source="sliding_window", got={"overlap": overlap, "batch_size": batch_size,
                                                        "precision": precision, "patch_size": tuple(patch_size)})  # fmt: skip
    patch = [int(p) for p in patch_size]
    pads = [max(0, p - n) for p, n in zip(patch, spatial, strict=True)]
    if any(pads):  # F.pad takes the last axis first: (before, after) pairs, centred
        widths = [w for pad in reversed(pads) for w in (pad // 2, pad - pad // 2)]
        image = F.pad(image[None], widths, value=pad_value)[0]
    padded = image.shape[1:]
    starts = [window_starts(n, p, overlap) for n, p in zip(padded, patch, strict=True)]
    corners = list(itertools.product(*starts))
    device = _model_device(model, image)
    target = torch.device(accumulate_device) if accumulate_device is not None else image.device
    importance = importance_map(tuple(patch), sigma_scale).to(target)  # [*patch]
    weighting = importance.to(accumulate_dtype)
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
                raise InvalidInputError("sliding-window models must return one tensor of logits",
                                        source="model", got=type(logits).__name__)  # fmt: skip
            logits = logits.to(device=target, dtype=accumulate_dtype, memory_format=torch.contiguous_format)
            if output is None:
                output = torch.zeros((logits.shape[1], *padded), device=target, dtype=accumulate_dtype)
            for window_logits, corner in zip(logits, batch, strict=True):
                region = _slices(corner, patch)
                output[(slice(None), *region)].addcmul_(window_logits, weighting)
                weight_sum[region] += importance
    assert output is not None  # at least one window always runs
    output.div_(weight_sum)
    crop = tuple(slice(pad // 2, pad // 2 + n) for pad, n in zip(pads, spatial, strict=True))
    return output[(slice(None), *crop)] if any(pads) else output


def _model_device(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.device:
    """The device of the model's first parameter; the image's for parameterless callables."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return image.device


def _slices(corner: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(start, start + p) for start, p in zip(corner, patch, strict=True))
