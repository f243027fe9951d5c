"""The base class of every mednets model: one gradient-checkpointing switch and memory-format helpers.

Checkpointing goes through `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` at the
call site in `forward` (the seed wrapped modules with the `torch.utils.checkpoint` *module*, which
cannot work). During the recomputation in the backward pass, normalisation layers must not update
their running statistics a second time, or checkpointing would change the trained model; the
recompute context below freezes them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mednets.errors import InvalidInputError
from mednets.models.kernels import conv1x1, norm_relu_project, supports_fused_tail

__all__ = ["MednetsModel", "check_input", "layer_inputs", "input_channels", "memory_format_for"]


@contextlib.contextmanager
def _frozen_norm_statistics(block: nn.Module) -> Iterator[None]:
    """Run `block` without touching the running statistics of its batch-norm layers."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for norm, momentum, tracked in saved:
            norm.momentum = momentum
            if tracked is not None:
                norm.num_batches_tracked.copy_(tracked)


def _recomputed(norms_of: nn.Module, function: Callable[..., Any], *inputs: Any) -> Any:
    """`function(*inputs)` checkpointed: recomputed in the backward pass with the batch-norm running
    statistics of `norms_of` frozen during the recomputation."""
    return checkpoint(
        function,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _frozen_norm_statistics(norms_of)),
    )


def memory_format_for(spatial_dims: int) -> torch.memory_format:
    """`channels_last` for 2D models, `channels_last_3d` for 3D ones."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def input_channels(model: nn.Module) -> int:
    """The channels a built model takes: those of its first convolution (a run may override the registry's)."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    raise InvalidInputError("the model has no convolution to read its input channels from",
                            source=type(model).__name__)  # fmt: skip


def layer_inputs(
    model: nn.Module, input_size: Sequence[int], kinds: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)
) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Every call of a layer of `kinds` (convolutions by default) in a forward pass of `[1, C, *input_size]`.

    Traced on a copy on the meta device: no arithmetic, no memory for activations.

    Returns:
        (module name, module, the spatial size of its input) per call, in call order; a module called
        at several scales appears once per call.
    """
    traced = copy.deepcopy(model).to("meta").eval()
    calls: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    for name, module in traced.named_modules():
        if isinstance(module, kinds):
            module.register_forward_pre_hook(
                lambda module, args, name=name: calls.append((name, module, tuple(args[0].shape[2:])))
            )
    with torch.no_grad():
        traced(torch.empty(1, input_channels(model), *input_size, device="meta"))
    return calls


def check_input(x: torch.Tensor, *, channels: int, spatial_dims: int, name: str = "input") -> None:
    """Raise `InvalidInputError` unless `x` is `[B, channels, *spatial]` with `spatial_dims` axes."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError("must be a tensor", source=name, got=type(x).__name__)
    layout = "[B, C, D, H, W]" if spatial_dims == 3 else "[B, C, H, W]"
    if x.ndim != spatial_dims + 2:
        raise InvalidInputError(
            f"has the wrong rank for a {spatial_dims}D model",
            source=name,
            expected=f"{spatial_dims + 2} axes {layout}",
            got=f"{x.ndim} axes {tuple(x.shape)}",
        )
    if x.shape[1] != channels:
        raise InvalidInputError(
            "has the wrong number of channels",
            source=name,
            expected=f"{channels} channels (axis 1 of {layout})",
            got=f"{x.shape[1]} in shape {tuple(x.shape)}",
        )


class MednetsModel(nn.Module):
    """`nn.Module` with a gradient-checkpointing switch shared by every model.

    Subclasses call `self.run_block(block, *inputs)` for each stage in `forward`; with
    checkpointing on (and gradients being recorded) the stage's activations are recomputed in the
    backward pass instead of being stored.
    """

    spatial_dims: int = 2

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> MednetsModel:
        """Turn gradient checkpointing on or off; returns the model for chaining."""
        self.gradient_checkpointing = bool(enabled)
        return self

    def run_block(self, block: Callable[..., Any], *inputs: Any) -> Any:
        """Call `block(*inputs)`, checkpointed when the switch is on and autograd is recording."""
        if self.gradient_checkpointing and torch.is_grad_enabled() and isinstance(block, nn.Module):
            return _recomputed(block, block, *inputs)
        return block(*inputs)

    def run_cheap_tail(
        self,
        block: nn.Sequential,
        x: torch.Tensor,
        tail_start: int,
        projection: nn.Module | None = None,
        *,
        projection_bias: bool = True,
    ) -> torch.Tensor:
        """`block[:tail_start]`, then a cheap tail whose activations are not stored for backward.

        The tail is the norm `block[tail_start]`, the ReLU `block[tail_start + 1]`, a 1x1(x1)
        convolution (`block[tail_start + 2]`, or `projection` when the block ends with the ReLU; its
        bias left out with `projection_bias=False`) and any parameter-free layers after it (a sigmoid).
        For full-resolution branches such as SADAAn's attention, feature-matching and segmentation
        branches, whose normalised and activated maps are full-size while the projection has a few
        channels: batch norms and `InstanceNorm`s run `mednets.models.kernels.norm_relu_project`
        (only the norm's input is kept, and the backward holds two full-size temporaries instead of
        three); other norms recompute the tail through checkpointing. Running statistics are updated
        once. With the checkpointing switch on, the whole block is checkpointed instead.
        """
        layers = list(block)  # plain Sequentials: slicing a subclass would call its own __init__
        head, norm, relu = nn.Sequential(*layers[:tail_start]), layers[tail_start], layers[tail_start + 1]
        if not isinstance(relu, nn.ReLU):
            raise TypeError(f"run_cheap_tail needs a ReLU after the norm, found {type(relu).__name__}")
        if projection is not None and len(layers) != tail_start + 2:
            raise TypeError("with a separate projection the block must end with the ReLU")
        rest = nn.Sequential(*layers[tail_start + 3 :])
        projection = projection if projection is not None else layers[tail_start + 2]
        bias = projection.bias if projection_bias else None

        def plain_tail(y: torch.Tensor) -> torch.Tensor:
            return rest(conv1x1(relu(norm(y)), projection.weight, bias))

        if not torch.is_grad_enabled():
            return plain_tail(head(x))
        if self.gradient_checkpointing:
            return _recomputed(block, lambda y: plain_tail(head(y)), x)
        if supports_fused_tail(norm):
            return rest(norm_relu_project(head(x), norm, projection.weight, bias))
        return _recomputed(norm, plain_tail, head(x))

    def to_channels_last(self) -> MednetsModel:
        """Move parameters to `channels_last` (2D) or `channels_last_3d` (3D) in place."""
        return self.to(memory_format=memory_format_for(self.spatial_dims))
