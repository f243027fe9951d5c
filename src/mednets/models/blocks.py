"""Dimension-generic building blocks: each exists once and serves 2D and 3D models.

Layer factories (`conv`, `conv_transpose`, `norm`, `activation`, `max_pool`) pick the 2D or 3D
PyTorch class from `spatial_dims` (3D convolutions and all max pools are the drop-in kernel
workarounds of `mednets.models.kernels`). The blocks built from them are `nn.Sequential`s of flat layers
where that keeps the seeds' layer names (`encoder1.0`, `encoder1.1`, ...): a stage can splice a
block's layers into its own `nn.Sequential(*block, pool)`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mednets.errors import UnknownNameError
from mednets.models.kernels import BF16SafeConv3d, InstanceNorm, MaxPool1d, MaxPool2d, MaxPool3d

__all__ = [
    "conv",
    "conv_transpose",
    "norm",
    "activation",
    "functional_activation",
    "max_pool",
    "ConvNormAct",
    "DoubleConv",
    "ResidualBlock",
    "Down",
    "Up",
    "pad_to_match",
]

LEAKY_RELU_SLOPE = 0.2


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: BF16SafeConv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

_MAX_POOL = {1: MaxPool1d, 2: MaxPool2d, 3: MaxPool3d}
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}
_FUNCTIONAL_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "leaky_relu": partial(F.leaky_relu, negative_slope=LEAKY_RELU_SLOPE),
    "gelu": F.gelu,
    "silu": F.silu,
}
NORMS = ("batch", "instance", "group", "none")


def _pick(table: dict, key: object, what: str) -> object:
    if key not in table:
        raise UnknownNameError(f"unknown {what}", source=what, expected=f"one of {sorted(table)}", got=key)
    return table[key]


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = True,
    padding: int | None = None,
) -> nn.Module:
    """A convolution; `padding=None` keeps the size ("same") for odd kernels at stride 1."""
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    conv_class = _pick(_CONV, spatial_dims, "spatial_dims")
    return conv_class(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )


def conv_transpose(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 2,
    *,
    stride: int = 2,
    padding: int = 0,
    bias: bool = True,
) -> nn.Module:
    """A transposed convolution; the defaults (kernel 2, stride 2) double the size exactly."""
    conv_class = _pick(_CONV_TRANSPOSE, spatial_dims, "spatial_dims")
    return conv_class(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


def norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer: `batch`, `instance` (affine, as `InstanceNorm`), `group` (8 groups or fewer) or `none`."""
    if kind == "batch":
        return _pick(_BATCH_NORM, spatial_dims, "spatial_dims")(channels)
    if kind == "instance":
        _pick(_BATCH_NORM, spatial_dims, "spatial_dims")  # the same check of spatial_dims as the others
        return InstanceNorm(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise UnknownNameError("unknown normalisation", source="norm", expected=f"one of {list(NORMS)}", got=kind)


def activation(name: str) -> nn.Module:
    """An activation module (`relu`, `leaky_relu` with slope 0.2, `gelu`, `silu`)."""
    return _pick(_ACTIVATIONS, name, "activation")()


def functional_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The functional form of `activation(name)`, for blocks whose layer tables list no activation."""
    return _pick(_FUNCTIONAL_ACTIVATIONS, name, "activation")


def max_pool(spatial_dims: int, kernel_size: int = 2) -> nn.Module:
    """Max pooling that divides every spatial size by `kernel_size` (rounding down)."""
    return _pick(_MAX_POOL, spatial_dims, "spatial_dims")(kernel_size)


class ConvNormAct(nn.Sequential):
    """Convolution (or transposed convolution), normalisation, activation: `[B, C_in, *S] -> [B, C_out, *S']`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the convolution.
        stride: stride; with `transposed=True` the upsampling factor.
        padding: convolution padding (default: "same" for odd kernels).
        dilation: dilation of the convolution.
        bias: whether the convolution has a bias (redundant before batch norm, kept where a seed has it).
        norm_kind: see `norm`.
        act: see `activation`.
        transposed: use a transposed convolution.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        bias: bool = True,
        norm_kind: str = "batch",
        act: str = "relu",
        transposed: bool = False,
    ) -> None:
        if transposed:
            layer = conv_transpose(
                spatial_dims,
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=0 if padding is None else padding,
                bias=bias,
            )
        else:
            layer = conv(
                spatial_dims,
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=bias,
            )
        super().__init__(layer, norm(norm_kind, spatial_dims, out_channels), activation(act))


class DoubleConv(nn.Sequential):
    """Two 3x3(x3) conv-norm-act layers, six flat layers: `[B, C_in, *S] -> [B, C_out, *S]`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        mid_channels: channels after the first convolution (default `out_channels`).
        bias: convolution bias (the UNet seed has none: batch norm supplies the shift).
        norm_kind: see `norm`.
        act: see `activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        *,
        bias: bool = False,
        norm_kind: str = "batch",
        act: str = "relu",
    ) -> None:
        mid_channels = mid_channels or out_channels
        layers = dict(bias=bias, norm_kind=norm_kind, act=act)
        super().__init__(
            *ConvNormAct(spatial_dims, in_channels, mid_channels, **layers),
            *ConvNormAct(spatial_dims, mid_channels, out_channels, **layers),
        )


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus a shortcut, then act: `[B, C_in, *S] -> [B, C_out, *S/stride]`.

    The shortcut is the identity when the block keeps width and resolution (no module: the
    submodules are `conv1`, `bn1`, `conv2`, `bn2`, as in the seed's layer tables), and ResNet's
    projection otherwise (`shortcut`: a strided 1x1(x1) convolution, then norm). The activation is
    functional, so it has no row of its own in layer tables.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (default `in_channels`).
        stride: stride of the first convolution and of the shortcut (`ceil(S / stride)`).
        bias: convolution bias (ResNet has none: the norm supplies the shift; seed 001 has one).
        norm_kind: see `norm`.
        act: see `activation`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        *,
        stride: int = 1,
        bias: bool = True,
        norm_kind: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.conv1 = conv(spatial_dims, in_channels, out_channels, 3, stride=stride, bias=bias)
        self.bn1 = norm(norm_kind, spatial_dims, out_channels)
        self.conv2 = conv(spatial_dims, out_channels, out_channels, 3, bias=bias)
        self.bn2 = norm(norm_kind, spatial_dims, out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(spatial_dims, in_channels, out_channels, 1, stride=stride, bias=bias),
                norm(norm_kind, spatial_dims, out_channels),
            )
        self.act = functional_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + (x if self.shortcut is None else self.shortcut(x)))


class Down(nn.Sequential):
    """Max-pool by 2, then `DoubleConv`: `[B, C_in, *S] -> [B, C_out, *S/2]`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, **double_conv: object) -> None:
        super().__init__(max_pool(spatial_dims, 2), DoubleConv(spatial_dims, in_channels, out_channels, **double_conv))


def pad_to_match(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Zero-pad `x`'s spatial axes (split evenly, extra at the end) to `reference`'s spatial size.

    Needed for odd input sizes, where pooling rounds down and upsampling comes back one short.
    """
    padding: list[int] = []
    for axis in range(x.ndim - 1, 1, -1):  # F.pad lists the last axis first
        missing = reference.shape[axis] - x.shape[axis]
        padding += [missing // 2, missing - missing // 2]
    return F.pad(x, padding) if any(padding) else x


class Up(nn.Module):
    """Upsample by 2, pad to the skip's size, concatenate the skip, then `DoubleConv`.

    `[B, C_in, *S/2]` + skip `[B, C_skip, *S]` -> `[B, C_out, *S]`. With `interpolate=True`
    (bilinear in 2D, trilinear in 3D) the upsampled features keep `C_in` channels and the
    DoubleConv's middle width is `C_in // 2` (the seed's bilinear variant); otherwise a transposed
    convolution halves the channels first.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        interpolate: bool = False,
        **double_conv: object,
    ) -> None:
        super().__init__()
        if interpolate:
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial_dims]
            self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=True)
            self.conv = DoubleConv(spatial_dims, in_channels, out_channels, in_channels // 2, **double_conv)
        else:
            self.up = conv_transpose(spatial_dims, in_channels, in_channels // 2, 2, stride=2)
            self.conv = DoubleConv(spatial_dims, in_channels, out_channels, **double_conv)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = pad_to_match(self.up(x), skip)
        return self.conv(torch.cat([skip, x], dim=1))
