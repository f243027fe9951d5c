"""Decoding model outputs into label maps and presence: claims, smallest-claim-first, slab-wise argmax.

Per-structure sigmoid models (SADAAn) let several structures claim a voxel; `claimed_labels` settles
each voxel by a priority, and `smallest_claim_first` is the priority that works (a large organ's
sigmoid spills over its small neighbours, not the reverse). `labels_from_logits` takes scores on a
model's grid to a label map on the input's grid without holding all classes at full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["claimed_labels", "labels_from_logits", "smallest_claim_first"]


def claimed_labels(claims: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Label map from per-structure claims: each voxel takes the claimant of highest priority.

    For independent per-structure outputs (SADAAn's sigmoids), where several structures can claim a
    voxel at once and the most probable one is not the best judge (`smallest_claim_first`).

    Args:
        claims: bool `[S, *spatial]` or `[B, S, *spatial]`: structure `s` claims the voxel.
        priority: `[S]` or `[B, S]`, higher wins; ties go to the first structure.

    Returns:
        int64 `[*spatial]` or `[B, *spatial]`: 0 where no structure claims the voxel, else `s + 1`.
    """
    axis = priority.ndim - 1  # the structure axis
    key = priority.float().reshape(*priority.shape, *([1] * (claims.ndim - priority.ndim)))
    key = torch.where(claims, key, torch.full_like(key, -torch.inf))  # [..., S, *spatial]
    return torch.where(claims.any(axis), key.argmax(axis) + 1, 0)


def smallest_claim_first(claims: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Priority for `claimed_labels`: the structure claiming the fewest voxels wins, `[..., S, *spatial] -> [..., S]`.

    A large organ's sigmoid spills over its small neighbours (the liver over the right adrenal), not
    the reverse (benchmarks/RESULTS.md compares it with the most probable structure).
    """
    return -claims.flatten(-spatial_dims).sum(-1).float()


def labels_from_logits(
    logits: torch.Tensor,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.uint8,
    slab: int = 16,
    priority: torch.Tensor | None = None,
) -> torch.Tensor:
    """Upsample class scores ``[C, *grid]`` to ``shape`` (trilinear / bilinear) and take the argmax, slab by slab.

    Never holds all classes at full resolution in float (the classic RAM blow-up, nnU-Net #2912): the
    output is made `slab` planes of the first axis at a time. Trilinear interpolation is separable, so
    each slab is the bilinear upsampling of the few source planes it needs, blended linearly along the
    first axis with `F.interpolate`'s own coordinates (``align_corners=False``). Peak extra memory is
    about ``C * (slab + 4) * H * W`` floats: ~280 MB for 14 classes at 512x512, whatever the depth.

    Args:
        logits: ``[C, D, H, W]`` or ``[C, H, W]`` scores on the model's grid.
        shape: output size ``(D', H', W')`` or ``(H', W')``.
        dtype: label dtype (uint8 holds up to 256 classes).
        slab: output planes per step.
        priority: `[C - 1]` (`claimed_labels`): a voxel takes, among the classes whose upsampled score
            beats class 0's (the background), the one of highest priority instead of the highest score.

    Returns:
        Label map ``shape`` of `dtype`: the index of the largest upsampled score (the first on ties),
        or of the claimant of highest priority.
    """
    if logits.ndim == 3:  # 2D: a depth of one plane, interpolated with scale 1 (exact)
        return labels_from_logits(logits[:, None], (1, *shape), dtype=dtype, slab=slab, priority=priority)[0]
    depth = logits.shape[1]
    out_depth, plane = int(shape[0]), tuple(int(n) for n in shape[1:])
    source = (torch.arange(out_depth, dtype=torch.float64) + 0.5) * (depth / out_depth) - 0.5
    source = source.clamp_min(0.0)
    below = source.floor().long().clamp_max(depth - 1)
    above = (below + 1).clamp_max(depth - 1)
    fraction = (source - below).float()
    labels = torch.empty(tuple(int(n) for n in shape), dtype=dtype)
    scores = torch.empty((logits.shape[0], min(slab, out_depth), *plane))  # [C, s, H', W'], reused
    for first in range(0, out_depth, slab):
        rows = range(first, min(first + slab, out_depth))
        low, high = int(below[first]), int(above[rows[-1]])
        planes = F.interpolate(logits[:, low : high + 1].float(), size=plane, mode="bilinear", align_corners=False)
        for j, row in enumerate(rows):  # blend the two planes around each output plane, in place
            torch.lerp(planes[:, below[row] - low], planes[:, above[row] - low], fraction[row], out=scores[:, j])
        block = scores[:, : len(rows)]  # [C, s, H', W']
        decided = block.argmax(0) if priority is None else claimed_labels(block[1:] > block[:1], priority)
        labels[first : rows[-1] + 1] = decided.to(dtype)
    return labels
