"""Tiled inference over 2D images of any size: overlapping tiles blended without seams.

Tiles of `tile` pixels step by `tile - overlap`; the last tile on each axis ends at the image edge.
Each tile's output is weighted by a separable window that is 0 within `margin` pixels of an edge it
shares with a neighbour (where the model saw the tile's padding rather than the image), rises as
sin² over the rest of the overlap, and is 1 elsewhere and along the image's own edges. Two
neighbours' ramps add up to exactly 1, and the weighted sum is divided by the summed weights, so a
model whose receptive field reaches no further than `margin` gives the same output as on the whole
image, and a constant image stays constant across tile borders.

Images smaller than a tile, or sides that are not a multiple of `multiple` (the autoencoders halve
four times: 16), are reflect-padded for the model and cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mednets.errors import ConfigError

__all__ = ["tile_starts", "tile_window", "tiled_apply"]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``; the last one ends at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def tile_window(tile: int, margin: int, ramp: int, *, first: bool, last: bool) -> torch.Tensor:
    """1D blending weights `[tile]`: 0 over `margin`, sin² over `ramp`, then 1, on each shared edge.

    Args:
        tile: tile length.
        margin: pixels at a shared edge that get no weight.
        ramp: length of the rise after the margin.
        first: the tile starts at the image edge (no ramp at its start).
        last: the tile ends at the image edge (no ramp at its end).
    """
    distance = torch.arange(tile, dtype=torch.float64) + 0.5  # pixel centres from the start edge
    weights = torch.ones(tile, dtype=torch.float64)
    for edge_distance, at_image_edge in ((distance, first), (tile - distance, last)):
        if at_image_edge:
            continue
        rise = ((edge_distance - margin) / max(ramp, 1)).clamp(0.0, 1.0)
        weights = weights * torch.sin(rise * math.pi / 2) ** 2
    return weights.float()


def tiled_apply(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile: int = 256,
    overlap: int = 64,
    margin: int = 16,
    multiple: int = 16,
    batch_size: int = 4,
) -> torch.Tensor:
    """Run `model` on overlapping tiles of `image` and blend the outputs.

    Args:
        model: maps ``[B, C, h, w]`` to ``[B, K, h, w]`` (any ``K``).
        image: ``[C, H, W]``.
        tile: tile side (rounded up to `multiple`; shrunk to the image for small images).
        overlap: pixels shared by neighbouring tiles; at least ``2 * margin + 1``.
        margin: pixels at each shared tile edge that get no weight.
        multiple: tile sides are multiples of this (the model's total downsampling).
        batch_size: tiles per forward pass.

    Returns:
        ``[K, H, W]`` float32 on the image's device.

    Raises:
        ConfigError: inconsistent tile, overlap and margin.
    """
    if image.ndim != 3:
        raise ConfigError("tiled inference takes one image [C, H, W]", source="image", got=tuple(image.shape))
    tile = math.ceil(tile / multiple) * multiple
    if not 2 * margin < overlap < tile:
        raise ConfigError(
            "need 2 * margin < overlap < tile",
            source="tiling",
            got={"tile": tile, "overlap": overlap, "margin": margin},
        )
    height, width = image.shape[1:]
    # Reflect-pad up to whole multiples and at least one tile (replicate where the image is too small to reflect).
    tile_h, tile_w = (min(tile, math.ceil(side / multiple) * multiple) for side in (height, width))
    padded_h, padded_w = max(height, tile_h), max(width, tile_w)
    pad = (0, padded_w - width, 0, padded_h - height)
    padded = image.float()[None]
    if any(pad):
        mode = "reflect" if pad[1] < width and pad[3] < height else "replicate"
        padded = F.pad(padded, pad, mode=mode)
    ramp = overlap - 2 * margin
    ys, xs = tile_starts(padded_h, tile_h, tile_h - overlap), tile_starts(padded_w, tile_w, tile_w - overlap)
    corners = [(y, x) for y in ys for x in xs]
    total: torch.Tensor | None = None
    weight_sum = torch.zeros(padded_h, padded_w, device=image.device)
    for batch_start in range(0, len(corners), batch_size):
        batch = corners[batch_start : batch_start + batch_size]
        tiles = torch.cat([padded[:, :, y : y + tile_h, x : x + tile_w] for y, x in batch])
        outputs = model(tiles).float()
        if total is None:
            total = torch.zeros(outputs.shape[1], padded_h, padded_w, device=image.device)
        for output, (y, x) in zip(outputs, batch, strict=True):
            window_y = tile_window(tile_h, margin, ramp, first=y == 0, last=y + tile_h == padded_h)
            window_x = tile_window(tile_w, margin, ramp, first=x == 0, last=x + tile_w == padded_w)
            weights = (window_y[:, None] * window_x[None, :]).to(image.device)
            total[:, y : y + tile_h, x : x + tile_w] += output * weights
            weight_sum[y : y + tile_h, x : x + tile_w] += weights
    assert total is not None  # at least one tile always runs
    return (total / weight_sum.clamp_min(1e-12))[:, :height, :width]
