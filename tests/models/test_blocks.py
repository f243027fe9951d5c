"""Dimension-generic blocks: the bf16 Conv3d workaround."""

from __future__ import annotations

import pytest
import torch

from mednets.models.blocks import conv


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_conv3d_weight_gradient_matches_fp32(depth: int, channels_last: bool) -> None:
    # torch 2.13 on CPU gets this gradient wrong in bf16 at depth 2 with batch >= 2; `conv` must not.
    layer = conv(3, 16, 16, 3)
    x = torch.randn(2, 16, depth, 8, 8)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    gradients = []
    for bf16 in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = layer(x)
        out.float().square().mean().backward()
        gradients.append(layer.weight.grad.clone())
    reference, low = gradients
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max() <= 0.02 * reference.abs().max()
