"""Histopathology denoising autoencoders (seed 001): `HistoAutoencoder` and `DeepHistoAutoencoder`.

Both map a noisy RGB tile in [0, 1] to a clean one through a sigmoid, so output and target share one
space. Layer names follow the seed's layer tables (`encoder1.0`, `decoder3.3.conv1`, `final.4`):
transposed convolutions have kernel 4, stride 2, padding 1, and each decoder stage after the first
concatenates its upsampled features with the encoder output at the same resolution (the *pooled*
output in `HistoAutoencoder`). Sizes must be divisible by 16.

The seed's output has the input's channels; `out_channels` (default: `in_channels`) changes only the
last 1x1 convolution, e.g. for a grey-to-colour model.
"""

from __future__ import annotations

import torch
from torch import nn

from mednets.errors import InvalidInputError
from mednets.models.base import MednetsModel, check_input
from mednets.models.blocks import ConvNormAct, DoubleConv, ResidualBlock, conv, max_pool
from mednets.models.registry import register_model

__all__ = ["HistoAutoencoder", "DeepHistoAutoencoder"]

_LAYER = dict(norm_kind="batch", act="leaky_relu", bias=True)
# Four 2x halvings: every side must be a multiple of 16 for the skips to line up.
SIZE_MULTIPLE = 16


def _upsample(in_channels: int, out_channels: int) -> ConvNormAct:
    """Transposed conv (kernel 4, stride 2, padding 1), batch norm, LeakyReLU: doubles the size."""
    return ConvNormAct(2, in_channels, out_channels, 4, stride=2, padding=1, transposed=True, **_LAYER)


def _output_head(channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv-BN-LeakyReLU, 1x1 conv, sigmoid: `[B, channels, H, W] -> [B, out_channels, H, W]` in [0, 1]."""
    return nn.Sequential(
        *ConvNormAct(2, channels, channels, **_LAYER), conv(2, channels, out_channels, 1), nn.Sigmoid()
    )


def _check_divisible(x: torch.Tensor, factor: int) -> None:
    if any(size % factor for size in x.shape[2:]):
        raise InvalidInputError(
            "spatial size must be divisible by 16 (four halvings)",
            source="input",
            expected=f"H and W multiples of {factor}",
            got=tuple(x.shape),
        )


class HistoAutoencoder(MednetsModel):
    """U-Net denoising autoencoder: `[B, C, H, W] -> [B, C_out, H, W]` in [0, 1]; 34,544,963 parameters at defaults.

    Args:
        in_channels: image channels (3 for RGB).
        base_channels: width of the first stage (seed: 64).
        out_channels: output image channels (default, as in the seed: `in_channels`).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, out_channels: int | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        c = [base_channels * 2**k for k in range(5)]
        self.encoder1 = self._encoder(in_channels, c[0])
        self.encoder2 = self._encoder(c[0], c[1])
        self.encoder3 = self._encoder(c[1], c[2])
        self.encoder4 = self._encoder(c[2], c[3])
        self.bottleneck = DoubleConv(2, c[3], c[4], **_LAYER)
        self.decoder4 = self._decoder(c[4], c[3])
        self.decoder3 = self._decoder(c[3] + c[2], c[2])
        self.decoder2 = self._decoder(c[2] + c[1], c[1])
        self.decoder1 = self._decoder(c[1] + c[0], c[0])
        self.final = _output_head(c[0], self.out_channels)

    @staticmethod
    def _encoder(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(*DoubleConv(2, in_channels, out_channels, **_LAYER), max_pool(2))

    @staticmethod
    def _decoder(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            *_upsample(in_channels, out_channels), *ConvNormAct(2, out_channels, out_channels, **_LAYER)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, channels=self.in_channels, spatial_dims=2)
        _check_divisible(x, SIZE_MULTIPLE)
        enc1 = self.run_block(self.encoder1, x)  # [B, 64, H/2, W/2]
        enc2 = self.run_block(self.encoder2, enc1)  # [B, 128, H/4, W/4]
        enc3 = self.run_block(self.encoder3, enc2)  # [B, 256, H/8, W/8]
        enc4 = self.run_block(self.encoder4, enc3)  # [B, 512, H/16, W/16]
        bottleneck = self.run_block(self.bottleneck, enc4)  # [B, 1024, H/16, W/16]
        dec4 = self.run_block(self.decoder4, bottleneck)  # [B, 512, H/8, W/8]
        dec3 = self.run_block(self.decoder3, torch.cat([dec4, enc3], 1))  # [B, 768 -> 256, H/4, W/4]
        dec2 = self.run_block(self.decoder2, torch.cat([dec3, enc2], 1))  # [B, 384 -> 128, H/2, W/2]
        dec1 = self.run_block(self.decoder1, torch.cat([dec2, enc1], 1))  # [B, 192 -> 64, H, W]
        return self.run_block(self.final, dec1)  # [B, C_out, H, W] in [0, 1]


class DeepHistoAutoencoder(MednetsModel):
    """ResNet + U-Net denoising autoencoder: `[B, C, H, W] -> [B, C_out, H, W]` in [0, 1]; 133,288,259 parameters.

    A 7x7 stem, four strided encoder stages with two residual blocks each, three residual blocks in
    the bottleneck, and four transposed-conv decoder stages with one residual block each.

    Args:
        in_channels: image channels (3 for RGB).
        base_channels: width of the stem (seed: 64).
        out_channels: output image channels (default, as in the seed: `in_channels`).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, out_channels: int | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        c = [base_channels * 2**k for k in range(5)]
        self.initial = ConvNormAct(2, in_channels, c[0], 7, **_LAYER)
        self.encoder1 = self._encoder(c[0], c[1])
        self.encoder2 = self._encoder(c[1], c[2])
        self.encoder3 = self._encoder(c[2], c[3])
        self.encoder4 = self._encoder(c[3], c[4])
        self.bottleneck = nn.Sequential(*(self._residual(c[4]) for _ in range(3)))
        self.decoder4 = self._decoder(c[4], c[3])
        self.decoder3 = self._decoder(c[3] + c[3], c[2])
        self.decoder2 = self._decoder(c[2] + c[2], c[1])
        self.decoder1 = self._decoder(c[1] + c[1], c[0])
        self.final = _output_head(c[0], self.out_channels)

    @staticmethod
    def _residual(channels: int) -> ResidualBlock:
        return ResidualBlock(2, channels, bias=True, norm_kind="batch", act="leaky_relu")

    @classmethod
    def _encoder(cls, in_channels: int, out_channels: int) -> nn.Sequential:
        downsample = ConvNormAct(2, in_channels, out_channels, 3, stride=2, **_LAYER)
        return nn.Sequential(*downsample, cls._residual(out_channels), cls._residual(out_channels))

    @classmethod
    def _decoder(cls, in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(*_upsample(in_channels, out_channels), cls._residual(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, channels=self.in_channels, spatial_dims=2)
        _check_divisible(x, SIZE_MULTIPLE)
        x = self.run_block(self.initial, x)  # [B, 64, H, W]
        enc1 = self.run_block(self.encoder1, x)  # [B, 128, H/2, W/2]
        enc2 = self.run_block(self.encoder2, enc1)  # [B, 256, H/4, W/4]
        enc3 = self.run_block(self.encoder3, enc2)  # [B, 512, H/8, W/8]
        enc4 = self.run_block(self.encoder4, enc3)  # [B, 1024, H/16, W/16]
        bottleneck = self.run_block(self.bottleneck, enc4)  # [B, 1024, H/16, W/16]
        dec4 = self.run_block(self.decoder4, bottleneck)  # [B, 512, H/8, W/8]
        dec3 = self.run_block(self.decoder3, torch.cat([dec4, enc3], 1))  # [B, 1024 -> 256, H/4, W/4]
        dec2 = self.run_block(self.decoder2, torch.cat([dec3, enc2], 1))  # [B, 512 -> 128, H/2, W/2]
        dec1 = self.run_block(self.decoder1, torch.cat([dec2, enc1], 1))  # [B, 256 -> 64, H, W]
        return self.run_block(self.final, dec1)  # [B, C_out, H, W] in [0, 1]


@register_model(
    "histo_autoencoder",
    task="denoising",
    spatial_dims=2,
    in_channels=3,
    out_channels=3,
    input_size=(256, 256),
    output_names=("denoised",),
    size_multiple=SIZE_MULTIPLE,
    description="U-Net denoising autoencoder for H&E tiles (seed 001), sigmoid output",
    param_count=34_544_963,
    tiny_overrides={"base_channels": 8},
    tiny_input_size=(32, 48),
)
def histo_autoencoder(in_channels: int = 3, out_channels: int = 3, base_channels: int = 64) -> nn.Module:
    return HistoAutoencoder(in_channels, base_channels, out_channels)


@register_model(
    "deep_histo_autoencoder",
    task="denoising",
    spatial_dims=2,
    in_channels=3,
    out_channels=3,
    input_size=(256, 256),
    output_names=("denoised",),
    size_multiple=SIZE_MULTIPLE,
    description="ResNet + U-Net denoising autoencoder for H&E tiles (seed 001), sigmoid output",
    param_count=133_288_259,
    tiny_overrides={"base_channels": 8},
    tiny_input_size=(32, 48),
)
def deep_histo_autoencoder(in_channels: int = 3, out_channels: int = 3, base_channels: int = 64) -> nn.Module:
    return DeepHistoAutoencoder(in_channels, base_channels, out_channels)
