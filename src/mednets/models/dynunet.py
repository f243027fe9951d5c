"""MONAI's DynUNet (the nnU-Net architecture) as the baseline segmenter without a presence head.

Wrapped so that it goes through the same registry, checkpointing switch and contract tests as every
mednets model. With checkpointing on, the whole network is one checkpointed block: only its input
is stored and everything is recomputed in the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

from mednets.models.base import MednetsModel, check_input
from mednets.models.kernels import BF16SafeConv3d, instance_norms_as_group_norms
from mednets.models.registry import register_model

__all__ = ["DynUNetSegmenter"]


class DynUNetSegmenter(MednetsModel):
    """nnU-Net-style U-Net: `[B, in_channels, *S] -> [B, out_channels, *S]` logits.

    Every spatial side must be a multiple of `2 ** (len(filters) - 1)` (16 for five levels): the
    decoder concatenates its skips without padding.

    Args:
        in_channels: input channels.
        out_channels: classes including background.
        filters: widths of the five levels.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        filters: Sequence[int] = (16, 32, 64, 128, 256),
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        levels = len(filters)
        self.net = DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * levels,
            strides=[1] + [2] * (levels - 1),
            upsample_kernel_size=[2] * (levels - 1),
            filters=list(filters),
            norm_name="instance",
            deep_supervision=False,
        )
        # MONAI builds plain Conv3d layers: give them the workaround for torch's CPU bf16 weight-gradient
        # bug at depth 2 (`BF16SafeConv3d`, same parameters), which the coarsest level of a 32³ patch hits.
        for module in self.net.modules():
            if type(module) is nn.Conv3d:
                module.__class__ = BF16SafeConv3d
        # MONAI's InstanceNorm3d layers turn channels_last_3d activations contiguous (two copies per
        # layer); the GroupNorm form computes the same statistics in place of the layout (`InstanceNorm`).
        instance_norms_as_group_norms(self.net)

    def segmentation_head(self) -> nn.Module:
        """The final logits layer (a presence head reads its input features)."""
        return self.net.output_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, channels=self.in_channels, spatial_dims=self.spatial_dims)
        return self.run_block(self.net, x)  # [B, out_channels, *S]


@register_model(
    "dynunet",
    task="segmentation",
    spatial_dims=3,
    in_channels=1,
    out_channels=14,
    input_size=(64, 64, 64),
    description="MONAI DynUNet (nnU-Net architecture), 16-256 channels: the baseline without a presence head",
    output_names=("logits",),
    size_multiple=16,
    param_count=5_643_422,
    tiny_overrides={"filters": (4, 8, 16, 32, 64)},
    tiny_input_size=(16, 32, 32),
)
def dynunet(in_channels: int = 1, out_channels: int = 14, filters: Sequence[int] = (16, 32, 64, 128, 256)) -> nn.Module:
    return DynUNetSegmenter(in_channels, out_channels, filters)
