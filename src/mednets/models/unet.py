"""UNet (seed 004), 2D and 3D: the classic encoder-decoder with skip connections.

Upsampling is interpolation (bilinear/trilinear, the seed's `bilinear=True`) or a transposed
convolution. Any input size works: pooling rounds down and each decoder stage pads back to its
skip's size (the seed's padding), so the output has the input's spatial size.
"""

from __future__ import annotations

import torch
from torch import nn

from mednets.models.base import MednetsModel, check_input
from mednets.models.blocks import DoubleConv, Down, Up, conv
from mednets.models.registry import register_model, register_variant

__all__ = ["UNet"]


class UNet(MednetsModel):
    """UNet: `[B, n_channels, *S] -> [B, n_classes, *S]` logits.

    The seed's signature: `n_channels` and `n_classes` are what `create_model` calls `in_channels` and
    `out_channels` (also readable as attributes of those names).

    Args:
        n_channels: input channels (`in_channels`).
        n_classes: output channels, logits (`out_channels`).
        bilinear: interpolation upsampling instead of transposed convolutions (halves the
            bottleneck width, as in the seed).
        spatial_dims: 2 or 3.
        base_channels: width of the first stage; stage k has `base_channels * 2**k` (seed: 64).
        norm: normalisation of every conv layer (`batch` as in the seed, `instance`, `group`).
    """

    def __init__(
        self,
        n_channels: int = 3,
        n_classes: int = 1,
        bilinear: bool = False,
        *,
        spatial_dims: int = 2,
        base_channels: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        self.spatial_dims = spatial_dims
        c = [base_channels * 2**k for k in range(5)]
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(spatial_dims, n_channels, c[0], norm_kind=norm)
        self.down1 = Down(spatial_dims, c[0], c[1], norm_kind=norm)
        self.down2 = Down(spatial_dims, c[1], c[2], norm_kind=norm)
        self.down3 = Down(spatial_dims, c[2], c[3], norm_kind=norm)
        self.down4 = Down(spatial_dims, c[3], c[4] // factor, norm_kind=norm)
        self.up1 = Up(spatial_dims, c[4], c[3] // factor, interpolate=bilinear, norm_kind=norm)
        self.up2 = Up(spatial_dims, c[3], c[2] // factor, interpolate=bilinear, norm_kind=norm)
        self.up3 = Up(spatial_dims, c[2], c[1] // factor, interpolate=bilinear, norm_kind=norm)
        self.up4 = Up(spatial_dims, c[1], c[0], interpolate=bilinear, norm_kind=norm)
        self.outc = conv(spatial_dims, c[0], n_classes, 1)

    @property
    def in_channels(self) -> int:
        """Alias of the seed's `n_channels`."""
        return self.n_channels

    @property
    def out_channels(self) -> int:
        """Alias of the seed's `n_classes`."""
        return self.n_classes

    def segmentation_head(self) -> nn.Module:
        """The final logits layer (a presence head reads its input features)."""
        return self.outc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, channels=self.n_channels, spatial_dims=self.spatial_dims)
        x1 = self.run_block(self.inc, x)  # [B, c0, *S]
        x2 = self.run_block(self.down1, x1)  # [B, c1, *S/2]
        x3 = self.run_block(self.down2, x2)  # [B, c2, *S/4]
        x4 = self.run_block(self.down3, x3)  # [B, c3, *S/8]
        x5 = self.run_block(self.down4, x4)  # [B, c4/factor, *S/16]
        x = self.run_block(self.up1, x5, x4)  # [B, c3/factor, *S/8]
        x = self.run_block(self.up2, x, x3)  # [B, c2/factor, *S/4]
        x = self.run_block(self.up3, x, x2)  # [B, c1/factor, *S/2]
        x = self.run_block(self.up4, x, x1)  # [B, c0, *S]
        return self.outc(x)  # [B, n_classes, *S]


@register_model(
    "unet",
    task="segmentation",
    spatial_dims=2,
    in_channels=3,
    out_channels=1,
    input_size=(512, 512),
    output_names=("logits",),
    size_multiple=1,
    export_multiple=16,
    description="UNet 2D (seed 004): transposed-conv upsampling, 64-1024 channels",
    param_count=31_037_633,
    tiny_overrides={},
    tiny_input_size=(37, 45),
)
def unet(
    in_channels: int = 3,
    out_channels: int = 1,
    bilinear: bool = False,
    spatial_dims: int = 2,
    base_channels: int = 64,
    norm: str = "batch",
) -> nn.Module:
    """The seed's UNet (`in_channels`, `out_channels` are its `n_channels`, `n_classes`)."""
    return UNet(in_channels, out_channels, bilinear, spatial_dims=spatial_dims, base_channels=base_channels, norm=norm)


register_variant(
    "unet3d",
    "unet",
    description="UNet 3D: the seed architecture in 3D, instance norm, 16-256 channels, patch-wise",
    param_count=5_646_606,
    spatial_dims=3,
    in_channels=1,
    out_channels=14,
    base_channels=16,
    norm="instance",
    input_size=(64, 128, 128),
    tiny_overrides={"base_channels": 4},
    tiny_input_size=(17, 35, 37),
)
