"""`norm -> ReLU -> 1x1 projection` with a hand-written backward that stores only the norm's input.

SADAAn's full-resolution branches end in a normalisation, a ReLU and a 1x1x1 convolution to a few
channels. Autograd would keep the normalised map and the ReLU output (two full-size maps per branch)
and, in backward, hold the projection's input gradient, the ReLU gradient and the norm gradient at
the same time. Here the backward recomputes the normalised map from the saved input and the forward's
own batch statistics (one fused kernel), computes the projection's gradients as matrix products over
the channels (a bf16 convolution backward would accumulate the full-size input gradient in a float32
buffer), turns the recomputed map in place into the ReLU's derivative and multiplies the gradient by
it in place, then runs the norm's fused backward kernel: two full-size temporaries at a time instead
of three or more, and no elementwise ReLU-backward pass.

Supported norms: `nn.BatchNorm1d/2d/3d` (training or eval mode, running statistics updated exactly
once, as the module would) and `mednets.models.blocks.InstanceNorm` (computed, as `F.instance_norm`
does, as a batch norm over `[1, B*C, *S]`). Under autocast the work runs in the input's dtype (the
convolution output's: bf16 under CPU autocast), with float32 statistics, as autocast would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mednets.models.blocks import InstanceNorm

__all__ = ["supports_fused_tail", "norm_relu_project", "conv1x1"]


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
