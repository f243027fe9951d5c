"""CPU/GPU kernel workarounds and fused operations used by the model blocks.

Everything here computes what a plain PyTorch layer or chain of layers computes, and differs only
in which kernel runs it, in what precision, or what it keeps for the backward pass:

- `BF16SafeConv3d`: `nn.Conv3d` that avoids a wrong bf16 weight gradient and a scratch-memory spike
  of the CPU bf16 kernels.
- `InstanceNorm`: instance normalisation as a `GroupNorm` that keeps channels-last layouts in inference;
  `instance_norms_as_group_norms` swaps it into foreign networks (MONAI).
- `without_cpu_autocast`, `MaxPool1d/2d/3d`, `global_average_pool`, `average_pool`: pooling in the
  input's precision under CPU autocast.
- `norm_relu_project`: `norm -> ReLU -> 1x1 projection` with a hand-written backward that stores only
  the norm's input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BF16SafeConv3d",
    "InstanceNorm",
    "instance_norms_as_group_norms",
    "without_cpu_autocast",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "global_average_pool",
    "average_pool",
    "supports_fused_tail",
    "norm_relu_project",
    "conv1x1",
]


class _Bf16ConvPerSampleWeightGrad(torch.autograd.Function):
    """A bf16 3D convolution whose backward computes the weight gradient one sample at a time.

    oneDNN's bf16 weight-gradient kernel reorders its whole input and output gradient into
    temporaries that dwarf the gradient itself; per sample they are smaller, at the same speed. The
    per-sample gradients are summed in float32. The input gradient, one call over the whole batch,
    comes after them.
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

    The bug: under CPU bf16 autocast, torch 2.13's Conv3d returns a wrong weight gradient (wildly
    off, or NaN) for some inputs with fewer than `SMALLEST_BF16_SIDE` voxels along an axis, with a
    batch of 2 or more, in either memory format: depth 2 at stride 1; width 1, or height 1, at
    stride 2 (`benchmarks/bf16_conv3d_gradients.py`; every input with all sides at least 4 was
    right). Such maps occur at the coarse levels of 3D networks and in pooled context branches,
    and one bad step ruins a training run. Every call on such a small map runs in float32 here:
    it costs little, as the map is small.

    The memory: in training with a batch of 2 or more and large maps (at least
    `PER_SAMPLE_WEIGHT_GRAD_ELEMENTS` input elements per sample: SADAAn's 64- and 128-channel
    full-resolution layers), the weight gradient is computed one sample at a time
    (`_Bf16ConvPerSampleWeightGrad`), which cuts the scratch memory of the bf16 weight-gradient
    kernel at the same speed. Below that size the split costs time and saves little, so everything
    else keeps the plain bf16 path.
    """

    PER_SAMPLE_WEIGHT_GRAD_ELEMENTS = 2**24
    SMALLEST_BF16_SIDE = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_bf16 = (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        if cpu_bf16 and min(x.shape[2:]) < self.SMALLEST_BF16_SIDE:
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


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation with the faster CPU kernel for each case: `[B, C, *S] -> [B, C, *S]`.

    The statistics are those of `nn.InstanceNorm{1,2,3}d` without running stats (per sample and channel,
    biased variance, same `eps`), for any number of spatial axes, and the affine parameters have the
    same names. Without gradients (inference) it runs as `nn.GroupNorm` with one channel per group,
    which keeps channels_last(_3d); PyTorch's InstanceNorm returns a contiguous tensor from a
    channels-last input, so each layer costs two layout copies. With gradients it runs
    `F.instance_norm`, whose backward is the faster one.
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
    pools run in the input's dtype, which makes bf16 training steps faster and lighter. Not used for
    adaptive average pooling: its bf16 kernel is slower than autocast's float32 one, so it keeps autocast.
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
    (nearest upsampling). Faster on CPU than `adaptive_avg_pool3d`, which CPU autocast runs in float32.
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
    `_StridedAveragePool` (much faster on CPU), otherwise the adaptive pool itself.
    """
    if rate == 1:
        return x
    if all(n % rate == 0 for n in x.shape[2:]):
        return _StridedAveragePool.apply(x, rate)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[x.ndim - 2]
    return pool(x, [-(-n // rate) for n in x.shape[2:]])


# --------------------------------------------------------------------------------------------------
# norm -> ReLU -> 1x1 projection, fused
# --------------------------------------------------------------------------------------------------


def supports_fused_tail(norm: nn.Module) -> bool:
    """True when `norm_relu_project` can run `norm`."""
    return isinstance(norm, (nn.modules.batchnorm._BatchNorm, InstanceNorm)) and not isinstance(norm, nn.SyncBatchNorm)


@dataclass(frozen=True)
class _BatchNormCall:
    """How one call of `norm` maps onto `torch.native_batch_norm`."""

    training: bool  # batch statistics (True) or running statistics (False)
    momentum: float
    eps: float
    folded_batch: int  # instance norm: the batch folded into the channel axis; batch norm: 0


def _batch_norm_call(norm: nn.Module, x: torch.Tensor) -> tuple[_BatchNormCall, torch.Tensor | None, ...]:
    """The call's settings, then its input, weight, bias, running mean and running variance.

    Mirrors `nn.modules.batchnorm._BatchNorm.forward` (momentum, `num_batches_tracked`) and
    `F.instance_norm` (a batch norm over `[1, B*C, *S]` with the affine parameters repeated)."""
    if isinstance(norm, InstanceNorm):
        batch = x.shape[0]
        folded = x.contiguous().view(1, -1, *x.shape[2:])  # [1, B*C, *S]
        weight = None if norm.weight is None else norm.weight.repeat(batch)
        bias = None if norm.bias is None else norm.bias.repeat(batch)
        return _BatchNormCall(True, 0.0, norm.eps, batch), folded, weight, bias, None, None
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    training = norm.training or (norm.running_mean is None and norm.running_var is None)
    keep_running = not norm.training or norm.track_running_stats
    running_mean = norm.running_mean if keep_running else None
    running_var = norm.running_var if keep_running else None
    return _BatchNormCall(training, momentum, norm.eps, 0), x, norm.weight, norm.bias, running_mean, running_var


def _projection_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Input, weight and bias gradients of the 1x1 convolution `weight` ([P, C, 1, ...]) of `x` ([B, C, *S]).

    As matrix products over the channels, in `x`'s layout: a bf16 convolution backward would
    accumulate the `[B, C, *S]` input gradient in a float32 buffer (twice its size)."""
    batch, channels = x.shape[:2]
    matrix = weight.reshape(weight.shape[0], channels)  # [P, C]
    grad = grad.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last):
        x_rows = x.movedim(1, -1).reshape(-1, channels)  # [B*S, C], a view
        grad_rows = grad.movedim(1, -1).reshape(-1, matrix.shape[0])  # [B*S, P]
        grad_x = (grad_rows @ matrix).view(batch, *x.shape[2:], channels).movedim(-1, 1)  # channels-last
        grad_weight = grad_rows.t() @ x_rows  # [P, C]
    else:
        x_flat, grad_flat = x.reshape(batch, channels, -1), grad.reshape(batch, matrix.shape[0], -1)
        grad_x = (matrix.t() @ grad_flat).view(x.shape)  # [B, C, *S]
        grad_weight = (grad_flat @ x_flat.transpose(1, 2)).sum(0)  # [P, C]
    accumulate = torch.promote_types(grad.dtype, torch.float32)
    grad_bias = grad.sum(dim=(0, *range(2, grad.ndim)), dtype=accumulate) if with_bias else None
    return grad_x, grad_weight.view(weight.shape), grad_bias


class _NormReluProject(torch.autograd.Function):
    """`norm -> ReLU -> 1x1 projection` with a hand-written backward that stores only the norm's input.

    SADAAn's full-resolution branches end in a normalisation, a ReLU and a 1x1x1 convolution to a few
    channels. Autograd would keep the normalised map and the ReLU output (two full-size maps per
    branch) and, in backward, hold the projection's input gradient, the ReLU gradient and the norm
    gradient at the same time. Here the backward recomputes the normalised map from the saved input
    and the forward's own batch statistics (one fused kernel), computes the projection's gradients as
    matrix products over the channels (a bf16 convolution backward would accumulate the full-size
    input gradient in a float32 buffer), turns the recomputed map in place into the ReLU's derivative
    and multiplies the gradient by it in place, then runs the norm's fused backward kernel: two
    full-size temporaries at a time instead of three or more, and no elementwise ReLU-backward pass.

    Supported norms: `nn.BatchNorm1d/2d/3d` (training or eval mode, running statistics updated
    exactly once, as the module would) and `InstanceNorm` (computed, as `F.instance_norm` does, as a
    batch norm over `[1, B*C, *S]`). Under autocast the work runs in the input's dtype (the
    convolution output's: bf16 under CPU autocast), with float32 statistics, as autocast would.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        norm_weight: torch.Tensor | None,
        norm_bias: torch.Tensor | None,
        projection_weight: torch.Tensor,
        projection_bias: torch.Tensor | None,
        norm: nn.Module,
    ) -> torch.Tensor:
        call, bn_input, weight, bias, running_mean, running_var = _batch_norm_call(norm, x)
        with torch.autocast(x.device.type, enabled=False):
            normed, save_mean, save_invstd = torch.native_batch_norm(
                bn_input, weight, bias, running_mean, running_var, call.training, call.momentum, call.eps
            )
            activated = normed.view(x.shape).relu_()
            out = conv1x1(activated, projection_weight, projection_bias)
        # running statistics are kept as they are now: eval-mode backward needs the forward's values
        stats = (save_mean, save_invstd) if call.training else (running_mean.clone(), running_var.clone())
        ctx.save_for_backward(bn_input, weight, bias, projection_weight, projection_bias, *stats)
        ctx.call, ctx.shape = call, x.shape
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        bn_input, weight, bias, projection_weight, projection_bias, mean, second = ctx.saved_tensors
        call: _BatchNormCall = ctx.call
        needs = ctx.needs_input_grad
        with torch.autocast(grad_out.device.type, enabled=False):
            # the forward's normalised map, from its own statistics (eval-mode kernel), then ReLU in place
            variance = second.pow(-2) - call.eps if call.training else second
            normed = F.batch_norm(bn_input, mean, variance, weight, bias, False, 0.0, call.eps)
            activated = normed.view(ctx.shape).relu_()
            grad_activated, grad_projection, grad_projection_bias = _projection_backward(
                grad_out, activated, projection_weight.to(activated.dtype), projection_bias is not None
            )
            grad_activated.mul_(activated.sign_())  # ReLU's derivative: 1 where the output is positive
            del normed, activated
            grad_normed = grad_activated.reshape(bn_input.shape)
            del grad_activated
            grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_normed, bn_input, weight,
                None if call.training else mean, None if call.training else second,
                mean if call.training else None, second if call.training else None,
                call.training, call.eps, [needs[0], weight is not None and needs[1], bias is not None and needs[2]],
            )  # fmt: skip
        if call.folded_batch:  # instance norm: back to [B, C, *S], affine gradients summed over the batch
            grad_x = None if grad_x is None else grad_x.view(ctx.shape)
            grad_weight = None if grad_weight is None else grad_weight.view(call.folded_batch, -1).sum(0)
            grad_bias = None if grad_bias is None else grad_bias.view(call.folded_batch, -1).sum(0)
        return (
            grad_x,
            grad_weight,
            grad_bias,
            None if grad_projection is None else grad_projection.to(projection_weight.dtype),
            None if grad_projection_bias is None else grad_projection_bias.to(projection_bias.dtype),
            None,
        )


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution of `x` (2D or 3D) in `x`'s dtype."""
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    return conv(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def norm_relu_project(
    x: torch.Tensor, norm: nn.Module, projection_weight: torch.Tensor, projection_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`conv1x1(relu(norm(x)))`: `[B, C, *S] -> [B, P, *S]`, storing only `x` (and statistics) for backward.

    Same values and gradients as the three modules in a row (tested to 1e-10 in float64), running
    statistics updated once. `norm` must pass `supports_fused_tail`.

    Args:
        x: `[B, C, D, H, W]` or `[B, C, H, W]`, the norm's input.
        norm: a batch norm or `InstanceNorm` over `C` channels.
        projection_weight: `[P, C, 1, 1(, 1)]`.
        projection_bias: `[P]` or None.
    """
    if not supports_fused_tail(norm):
        raise TypeError(f"norm_relu_project supports batch norm and InstanceNorm, not {type(norm).__name__}")
    return _NormReluProject.apply(x, norm.weight, norm.bias, projection_weight, projection_bias, norm)
