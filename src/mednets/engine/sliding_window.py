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

`WindowPresence` lets a model with a presence head go through the blender: its logits are blended,
its per-window presence logits kept, and a structure's logit for the image is its largest window's
(present if any window sees it).

`sliding_window_blocks` is the seamless blender for 2D images too large for memory (whole slides): it
reads the image region by region and hands back finished blocks, with the same windows, batches,
weights and sums as `sliding_window` on the whole image, so its output is the same bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from torch import nn
from tqdm.auto import tqdm

from mednets.devices import resolve_device
from mednets.errors import ConfigError, InvalidInputError
from mednets.host_memory import reuse_freed_memory

__all__ = [
    "WEIGHTINGS",
    "WindowPresence",
    "importance_map",
    "seamless_grid",
    "seamless_window",
    "sliding_window",
    "sliding_window_blocks",
    "window_starts",
]

WEIGHTINGS = ("gaussian", "seamless")


class WindowPresence(nn.Module):
    """`model` as the blender needs it (one logits tensor per batch of windows), keeping its presence logits.

    Use one per image: `logits = sliding_window(wrapper, ...)`, then `wrapper.outputs(logits)`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.window_logits: list[torch.Tensor] = []  # [windows, K] per batch

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        outputs = self.model(windows)
        if not isinstance(outputs, dict):
            return outputs
        self.window_logits.append(outputs["presence_logits"].float())
        return outputs["logits"]

    def outputs(self, logits: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The blended `logits` `[B, C, *S]`, with `presence_logits` `[B, K]` (largest over windows) if any."""
        if not self.window_logits:
            return logits
        largest = torch.cat(self.window_logits).amax(0, keepdim=True).to(logits.device)
        return {"logits": logits, "presence_logits": largest.expand(logits.shape[0], -1)}


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


def seamless_grid(
    spatial: Sequence[int], patch_size: Sequence[int], overlap: float, size_multiple: int = 1
) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """The windows of seamless blending over an image of shape `spatial`, one list per axis.

    Returns:
        (patch, overlaps, padded, starts): the window size (the patch rounded up to `size_multiple`,
        shrunk to small images), the pixels neighbours share, the image size after reflect-padding a
        side shorter than the window, and each axis's window starts (the last one flush with the end).
    """

    def whole(n: int) -> int:
        return math.ceil(n / size_multiple) * size_multiple

    patch = [min(whole(p), whole(n)) for p, n in zip(patch_size, spatial, strict=True)]
    padded = [max(n, p) for n, p in zip(spatial, patch, strict=True)]
    overlaps = [max(1, round(overlap * p)) if overlap > 0 else 0 for p in patch]
    starts = [_starts(n, p, max(1, p - o)) for n, p, o in zip(padded, patch, overlaps, strict=True)]
    return patch, overlaps, padded, starts


def _pad(
    image: torch.Tensor, before: Sequence[int], after: Sequence[int], mode: str, value: float | Sequence[float]
) -> torch.Tensor:
    """Pad the spatial axes of ``[C, *S]``: "constant" with `value` (one, or one per channel), else reflect."""
    if not any(before) and not any(after):
        return image
    if mode == "constant":
        fill = torch.as_tensor(value, dtype=image.dtype, device=image.device).reshape(-1, *([1] * (image.ndim - 1)))
        shape = [n + b + a for n, b, a in zip(image.shape[1:], before, after, strict=True)]
        out = fill.expand(image.shape[0], *shape).clone()
        out[(slice(None), *(slice(b, b + n) for b, n in zip(before, image.shape[1:], strict=True)))] = image
        return out
    widths = [w for b, a in zip(reversed(before), reversed(after), strict=True) for w in (b, a)]  # last axis first
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
    pad_value: float | Sequence[float] = 0.0,
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
        pad_value: fill for axes shorter than a gaussian window (one, or one per channel: what
            training padded with, e.g. air).
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
        patch, overlaps, padded_shape, starts = seamless_grid(spatial, patch_size, overlap, size_multiple)
        before = [0] * len(spatial)
        image = _pad(image, before, [p - n for n, p in zip(spatial, padded_shape, strict=True)], "reflect", 0.0)
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


def sliding_window_blocks(
    model: Callable[[torch.Tensor], torch.Tensor],
    read_region: Callable[[int, int, int, int], torch.Tensor],
    shape: Sequence[int],
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 2,
    size_multiple: int = 1,
    precision: str = "bf16",
    channels_last: bool = True,
    read_width: int = 1024,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Seamless blending of a 2D image read region by region; yields its finished output in blocks.

    The windows, their batches, weights and sums are those of ``sliding_window(weights="seamless")`` on
    the whole image, taken in the same order, so every output pixel is equal to its bit for bit. What is
    held does not grow with the image's height, and little with its width: the windows of one batch,
    the input of one window row read `read_width` columns at a time, and the partial sums of the rows
    one window row shares with the next (``overlap * patch`` rows across the width, float32).

    Args:
        model: maps ``[B, C, *patch]`` to ``[B, K, *patch]`` (eval mode; on the device it should run on).
        read_region: ``read_region(top, left, height, width)`` gives that region of the image,
            ``[C, height, width]`` float; regions come row of windows by row of windows, left to right.
        shape: the image's ``(H, W)``.
        patch_size: window size ``(h, w)``; `overlap`, `batch_size`, `size_multiple`, `precision` and
            `channels_last` as for `sliding_window`.
        read_width: columns read at a time (at least a window's width).

    Yields:
        ``(top, left, block)``: ``block`` ``[K, h, w]`` float32 on the model's device is the output at rows
        ``[top, top + h)`` and columns ``[left, left + w)``. Blocks come band by band (one band per row
        of windows), each band left to right, and tile the image exactly.

    Raises:
        ConfigError: bad overlap, batch size, precision or patch size; InvalidInputError: bad shape.
    """
    if len(shape) != 2 or len(patch_size) != 2 or min(shape) < 1:
        raise InvalidInputError("expected a 2D image shape (H, W) and one patch size per axis", source="image",
                                got={"shape": tuple(shape), "patch_size": tuple(patch_size)})  # fmt: skip
    if not 0.0 <= overlap < 1.0 or batch_size < 1 or precision not in ("bf16", "fp32") or min(patch_size) < 1:
        raise ConfigError("sliding window: need 0 <= overlap < 1, batch_size >= 1, precision bf16 or fp32",
                          source="sliding_window_blocks", got={"overlap": overlap, "batch_size": batch_size,
                          "precision": precision, "patch_size": tuple(patch_size)})  # fmt: skip
    height, width = (int(n) for n in shape)
    patch, overlaps, padded, starts = seamless_grid((height, width), patch_size, overlap, size_multiple)
    corners = list(itertools.product(*starts))
    device = _model_device(model, torch.empty(0))
    window_weights = _window_weights("seamless", patch, padded, overlaps, 0.0, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    source = _SourceRows(read_region, (height, width), padded, patch[0], max(read_width, patch[1]), device, dtype)
    row: _WindowRow | None = None
    following = {top: after for top, after in itertools.pairwise([*starts[0], padded[0]])}  # next row of windows
    for first in range(0, len(corners), batch_size):
        batch = corners[first : first + batch_size]
        blocks: list[tuple[int, int, torch.Tensor]] = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            windows = torch.stack([source.window(corner, patch) for corner in batch])
            if channels_last:
                windows = windows.contiguous(memory_format=torch.channels_last)
            logits = model(windows)
            if not isinstance(logits, torch.Tensor):
                raise InvalidInputError("sliding-window models must return one tensor",
                                        source="model", got=type(logits).__name__)  # fmt: skip
            logits = logits.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format)
            for window_logits, (top, left) in zip(logits, batch, strict=True):
                if row is None or row.top != top:  # a new row of windows: the last one is finished
                    carry = None if row is None else row.finish(padded[1], blocks, (height, width))
                    row = _WindowRow(top, following[top] - top, patch, padded[1], carry)
                    source.drop_above(top)
                row.add(left, window_logits, window_weights((top, left)))
            assert row is not None
            done = first + len(batch) >= len(corners) or corners[first + len(batch)][0] != row.top
            stop = padded[1] if done else corners[first + len(batch)][1]  # no later window reaches left of it
            row.finish_columns(stop, blocks, (height, width))
        yield from blocks


class _WindowRow:
    """The sums of one row of windows (rows ``[top, top + patch)``), held for its columns not yet finished.

    Its first rows start from the partial sums of the row of windows above (`carry`, the rows they
    share); the rows it shares with the next row of windows become that row's carry.
    """

    def __init__(
        self, top: int, finished: int, patch: Sequence[int], width: int, carry: tuple[torch.Tensor, ...] | None
    ) -> None:
        self.top, self.finished, self.patch, self.carry = top, finished, patch, carry
        self.left = 0  # first column held
        self.sums: torch.Tensor | None = None  # [K, patch_h, held]
        self.weights: torch.Tensor | None = None  # [patch_h, held]
        self.next_carry: tuple[torch.Tensor, torch.Tensor] | None = None
        self.width = width

    def add(self, left: int, logits: torch.Tensor, importance: torch.Tensor) -> None:
        """Add one window's weighted output at column `left` (``sliding_window``'s ``addcmul_``)."""
        if self.sums is None or self.weights is None:
            rows = self.patch[0]
            self.sums = logits.new_zeros((logits.shape[0], rows, 0))
            self.weights = logits.new_zeros((rows, 0))
            if self.finished < rows:
                shared = rows - self.finished
                self.next_carry = (logits.new_zeros((logits.shape[0], shared, self.width)),
                                   logits.new_zeros((shared, self.width)))  # fmt: skip
        held = self.left + self.sums.shape[2]
        if left + self.patch[1] > held:  # hold more columns: zeros, or the carried sums of the shared rows
            grow = left + self.patch[1] - held
            sums = self.sums.new_zeros((self.sums.shape[0], self.sums.shape[1], grow))
            weights = self.weights.new_zeros((self.weights.shape[0], grow))
            if self.carry is not None:
                shared = self.carry[1].shape[0]
                sums[:, :shared] = self.carry[0][:, :, held : held + grow]
                weights[:shared] = self.carry[1][:, held : held + grow]
            self.sums = torch.cat([self.sums, sums], dim=2)
            self.weights = torch.cat([self.weights, weights], dim=1)
        columns = slice(left - self.left, left - self.left + self.patch[1])
        self.sums[:, :, columns].addcmul_(logits, importance)
        self.weights[:, columns] += importance

    def finish_columns(self, stop: int, blocks: list[tuple[int, int, torch.Tensor]], shape: Sequence[int]) -> None:
        """Columns ``[left, stop)`` are done: their finished rows go to `blocks`, the shared ones to the carry."""
        if self.sums is None or self.weights is None or stop <= self.left:
            return
        count = stop - self.left
        rows, columns = min(self.finished, shape[0] - self.top), min(stop, shape[1]) - self.left
        if rows > 0 and columns > 0:
            total = self.sums[:, :rows, :columns] / self.weights[:rows, :columns].clamp_min(1e-12)
            blocks.append((self.top, self.left, total))
        if self.next_carry is not None:
            self.next_carry[0][:, :, self.left : stop] = self.sums[:, self.finished :, :count]
            self.next_carry[1][:, self.left : stop] = self.weights[self.finished :, :count]
        self.sums, self.weights = self.sums[:, :, count:], self.weights[:, count:]
        self.left = stop

    def finish(
        self, stop: int, blocks: list[tuple[int, int, torch.Tensor]], shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The row of windows is done: its last columns go out; returns the carry of the next row."""
        self.finish_columns(stop, blocks, shape)
        return self.next_carry


class _SourceRows:
    """The input of the rows of windows in use: their rows of the (padded) image, read `read_width` columns at a time."""

    def __init__(
        self,
        read_region: Callable[[int, int, int, int], torch.Tensor],
        shape: Sequence[int],
        padded: Sequence[int],
        patch_rows: int,
        read_width: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.read_region, self.shape, self.padded = read_region, shape, padded
        self.patch_rows, self.read_width, self.device, self.dtype = patch_rows, read_width, device, dtype
        self.bands: dict[int, tuple[int, torch.Tensor]] = {}  # row of windows -> (first column, [C, rows, cols])

    def window(self, corner: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
        """The input ``[C, *patch]`` of the window at `corner`; the columns left of it are forgotten."""
        top, left = corner
        first, band = self.bands.get(top, (left, None))
        if band is not None and left > first:
            band, first = band[:, :, left - first :], left
        if band is None or left + patch[1] > first + band.shape[2]:
            start = left if band is None else first + band.shape[2]
            stop = min(max(left + patch[1], start + self.read_width), self.padded[1])
            more = self._read(top, start, stop)
            band = more if band is None else torch.cat([band, more], dim=2)
        self.bands[top] = (first, band)
        return band[:, :, left - first : left - first + patch[1]]

    def _read(self, top: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``[top, top + patch)`` and columns ``[start, stop)`` of the padded image, as `sliding_window` pads it."""
        height, width = self.shape
        if self.padded[1] > width:  # narrower than a window: one window per row, padded as a whole
            start, stop = 0, width
        rows = min(self.patch_rows, height - top)
        region = self.read_region(top, start, rows, min(stop, width) - start).float()
        pad_rows = self.padded[0] - height  # > 0 only when the image is shorter than a window (top == 0)
        region = _pad(region, [0, 0], [pad_rows, self.padded[1] - width if stop >= width else 0], "reflect", 0.0)
        return region.to(device=self.device, dtype=self.dtype)

    def drop_above(self, top: int) -> None:
        """Forget the rows of windows above `top`: no window still to come reads them."""
        self.bands = {row: band for row, band in self.bands.items() if row >= top}


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
