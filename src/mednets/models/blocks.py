"""Dimension-generic building blocks: each exists once and serves 2D and 3D models.

Layer factories (`conv`, `conv_transpose`, `norm`, `activation`, `max_pool`) pick the 2D or 3D
PyTorch class from `spatial_dims`. The blocks built from them are `nn.Sequential`s of flat layers
where that keeps the seeds' layer names (`encoder1.0`, `encoder1.1`, ...): a stage can splice a
block's layers into its own `nn.Sequential(*block, pool)`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mednets.errors import UnknownNameError

__all__ = [
    "BF16SafeConv3d",
    "InstanceNorm",
    "instance_norms_as_group_norms",
    "conv",
    "conv_transpose",
    "norm",
    "activation",
    "functional_activation",
    "max_pool",
    "without_cpu_autocast",
    "global_average_pool",
    "average_pool",
    "ConvNormAct",
    "DoubleConv",
    "ResidualBlock",
    "Down",
    "Up",
    "pad_to_match",
]

LEAKY_RELU_SLOPE = 0.2


class _Bf16ConvPerSampleWeightGrad(torch.autograd.Function):
    """A bf16 3D convolution whose backward computes the weight gradient one sample at a time.

    oneDNN's bf16 weight-gradient kernel reorders its whole input and output gradient into
    temporaries (measured at [2, 128, 64, 64, 64] channels_last_3d: 264 MB of scratch for a 0.8 MB
    result); per sample they are half the size, at the same speed. The per-sample gradients are summed
    in float32. The input gradient, one call over the whole batch, comes after them.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: nn.Conv3d,
    ) -> torch.Tensor:
        low_x, low_weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        low_bias = None if bias is None else bias.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            out = F.conv3d(low_x, low_weight, low_bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.save_for_backward(low_x, low_weight)
        ctx.settings = ([*conv.stride], [*conv.padding], [*conv.dilation], False, [0, 0, 0], conv.groups)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        low_x, low_weight = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        needs_x, needs_weight, needs_bias, _ = ctx.needs_input_grad
        needs_bias = needs_bias and bias_dtype is not None
        grad = grad.to(torch.bfloat16)
        bias_sizes = [low_weight.shape[0]] if bias_dtype is not None else None
        grad_x = grad_weight = grad_bias = None
        if needs_weight or needs_bias:
            for sample in range(low_x.shape[0]):
                _, weight_part, bias_part = torch.ops.aten.convolution_backward(
                    grad[sample : sample + 1], low_x[sample : sample + 1], low_weight, bias_sizes,
                    *ctx.settings, [False, needs_weight, needs_bias],
                )  # fmt: skip
                if needs_weight:
                    grad_weight = weight_part.float() + (0 if grad_weight is None else grad_weight)
                if needs_bias:
                    grad_bias = bias_part.float() + (0 if grad_bias is None else grad_bias)
        if needs_x:  # after the weights: their scratch is freed before the input gradient exists
            grad_x = torch.ops.aten.convolution_backward(
                grad, low_x, low_weight, None, *ctx.settings, [True, False, False]
            )[0].to(x_dtype)
        return (
            grad_x,
            None if grad_weight is None else grad_weight.to(weight_dtype),
            None if grad_bias is None else grad_bias.to(bias_dtype),
            None,
        )


class BF16SafeConv3d(nn.Conv3d):
    """`nn.Conv3d` for CPU bf16 autocast: sidesteps a bug and a memory spike of the bf16 kernels.

    The bug: under CPU bf16 autocast, torch 2.13's Conv3d returns a wrong weight gradient (off by
    100% up to 1e37, or NaN) when the input has depth 2 and a batch of 2 or more, in either memory
    format (measured; other sizes agree with fp32 within 0.5%). Such maps occur at the coarse levels
    of 3D networks and pooled context branches, and one bad step ruins a training run. Those calls
    run in float32 here.

    The memory: in training with a batch of 2 or more and large maps (at least
    `PER_SAMPLE_WEIGHT_GRAD_ELEMENTS` input elements per sample: SADAAn's 64- and 128-channel
    full-resolution layers), the weight gradient is computed one sample at a time
    (`_Bf16ConvPerSampleWeightGrad`), which halves the scratch memory of the bf16 weight-gradient
    kernel at batch 2 at the same speed. Below that size the split costs time (8-10% of a training
    step of LHA-Net or the 3D UNet at [2, 1, 64, 64, 64], measured) and saves little, so everything else
    keeps the plain bf16 path.
    """

    PER_SAMPLE_WEIGHT_GRAD_ELEMENTS = 2**24

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_bf16 = (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        if cpu_bf16 and x.shape[2] == 2 and x.shape[0] > 1:
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight, self.bias)
        if (
            cpu_bf16
            and x.shape[0] > 1
            and x[0].numel() >= self.PER_SAMPLE_WEIGHT_GRAD_ELEMENTS
            and torch.is_grad_enabled()
            and self._plain_zero_padding()
        ):
            return _Bf16ConvPerSampleWeightGrad.apply(x, self.weight, self.bias, self)
        return super().forward(x)

    def _plain_zero_padding(self) -> bool:
        return self.padding_mode == "zeros" and not isinstance(self.padding, str)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: BF16SafeConv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation with the faster CPU kernel for each case: `[B, C, *S] -> [B, C, *S]`.

    The statistics are those of `nn.InstanceNorm{1,2,3}d` without running stats (per sample and channel,
    biased variance, same `eps`), for any number of spatial axes, and the affine parameters have the
    same names. Without gradients (inference) it runs as `nn.GroupNorm` with one channel per group,
    which keeps channels_last(_3d); PyTorch's InstanceNorm returns a contiguous tensor from a
    channels-last input, so each layer costs two layout copies. With gradients it runs
    `F.instance_norm`, whose backward is the faster one. Measured on this CPU, conv3d + norm in bf16 at
    [2, 32, 64, 64, 64] channels_last_3d: forward 70 ms (group) against 99 ms (instance); forward +
    backward 487 ms (group) against 310 ms (instance).
    """

    def __init__(self, channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        return super().forward(x)


def instance_norms_as_group_norms(module: nn.Module) -> nn.Module:
    """Replace every `nn.InstanceNorm*d` without running stats in `module` (e.g. a MONAI network) by the
    equivalent `InstanceNorm`, keeping its affine parameters; returns `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            replacement = InstanceNorm(child.num_features, affine=child.affine, eps=child.eps)
            if child.affine:
                replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement.to(next(child.parameters(), torch.empty(0)).device))
        else:
            instance_norms_as_group_norms(child)
    return module


def without_cpu_autocast(op: Callable[..., torch.Tensor], x: torch.Tensor, *args: object) -> torch.Tensor:
    """`op(x, *args)` in `x`'s own precision: CPU autocast is switched off for the call.

    CPU autocast lists max, average and adaptive pooling as float32 ops: under bf16 each call copies
    its input to float32 (twice the memory, and the copy is kept for the backward pass) and returns
    float32 for the next convolution to cast back. Max pooling is exact in any precision, so the max
    pools run in the input's dtype (with `global_average_pool`: SADAAn's bf16 training step at the
    seed's size went from 10.6 s / 1698 MB to 5.5 s / 1536 MB). Not used for adaptive average
    pooling: its bf16 kernel made LHA-Net's bf16 forward 7% slower (measured), so it keeps autocast.
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return op(x, *args)
    return op(x, *args)


class _PoolInInputDtype:
    """Mixin for pooling layers: run in the input's precision (see `without_cpu_autocast`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return without_cpu_autocast(super().forward, x)  # type: ignore[misc]


class MaxPool1d(_PoolInInputDtype, nn.MaxPool1d):
    """`nn.MaxPool1d` in the input's precision under CPU autocast."""


class MaxPool2d(_PoolInInputDtype, nn.MaxPool2d):
    """`nn.MaxPool2d` in the input's precision under CPU autocast."""


class MaxPool3d(_PoolInInputDtype, nn.MaxPool3d):
    """`nn.MaxPool3d` in the input's precision under CPU autocast."""


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial axes in `x`'s precision: `[B, C, *S] -> [B, C]`.

    A sum then a division of the small result: the backward pass hands the convolutions an expanded
    view of the `[B, C]` gradient instead of materialising a full-size (float32, under CPU autocast)
    tensor as `nn.AdaptiveAvgPool3d(1)` does.
    """
    spatial = tuple(range(2, x.ndim))
    return x.sum(dim=spatial) / x.shape[2:].numel()


class _StridedAveragePool(torch.autograd.Function):
    """Average over non-overlapping ``rate``-wide windows of a map whose spatial sizes `rate` divides.

    The forward sums strided slices in (at least) float32, one axis at a time (``rate`` slices per axis), and
    rounds once to the input's dtype; the backward spreads each gradient value over its window
    (nearest upsampling). Measured on ``[2, 16, 64, 64, 64]`` bf16 channels_last_3d: 1.5 ms against
    16-17 ms for `adaptive_avg_pool3d` (which CPU autocast runs in float32) at rate 2.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rate: int) -> torch.Tensor:
        ctx.rate = rate
        accumulate = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input
        total = x
        for axis in range(2, x.ndim):
            index = [slice(None)] * x.ndim
            parts = []
            for offset in range(rate):
                index[axis] = slice(offset, None, rate)
                parts.append(total[tuple(index)])
            summed = parts[0].to(accumulate, copy=True)
            for part in parts[1:]:
                summed.add_(part)
            total = summed
        return total.mul_(1.0 / rate ** (x.ndim - 2)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        spread = F.interpolate(grad, scale_factor=ctx.rate, mode="nearest")
        return spread.mul_(1.0 / ctx.rate ** (grad.ndim - 2)), None


def average_pool(x: torch.Tensor, rate: int) -> torch.Tensor:
    """Average pooling by `rate` with ceil sizes, in `x`'s precision: `[B, C, *S] -> [B, C, *ceil(S / rate)]`.

    Equal to ``adaptive_avg_pool{1,2,3}d(x, ceil(S / rate))``; where `rate` divides every axis it runs
    `_StridedAveragePool` (about 10x faster on CPU), otherwise the adaptive pool itself.
    """
    if rate == 1:
        return x
    if all(n % rate == 0 for n in x.shape[2:]):
        return _StridedAveragePool.apply(x, rate)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[x.ndim - 2]
    return pool(x, [-(-n // rate) for n in x.shape[2:]])


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
