"""The base class of every mednets model: one gradient-checkpointing switch and memory-format helpers.

Checkpointing goes through `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` at the
call site in `forward` (the seed wrapped modules with the `torch.utils.checkpoint` *module*, which
cannot work). During the recomputation in the backward pass, normalisation layers must not update
their running statistics a second time, or checkpointing would change the trained model; the
recompute context below freezes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mednets.errors import InvalidInputError

__all__ = ["MednetsModel", "memory_format_for", "check_input"]


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
        then: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`then(block(x))`, storing for backward none of the activations of the cheap tail `block[tail_start:]` + `then`.

        For full-resolution branches that end in normalisation, activation and a 1x1(x1) projection:
        that tail costs little to run again in the backward pass, while its stored activations are
        full-size maps (SADAAn's attention, feature-matching and segmentation branches: 0.26 GB of a
        bf16 training step at the seed's size). Only the tail's input is kept, which the normalisation
        layer keeps anyway. Running statistics are updated once. With the checkpointing switch on, the
        whole block is checkpointed instead.
        """
        then = then if then is not None else (lambda y: y)
        if self.gradient_checkpointing or not torch.is_grad_enabled():
            return then(self.run_block(block, x))
        layers = list(block)  # plain Sequentials: slicing a subclass would call its own __init__
        head, tail = nn.Sequential(*layers[:tail_start]), nn.Sequential(*layers[tail_start:])
        return _recomputed(tail, lambda y: then(tail(y)), head(x))

    def to_channels_last(self) -> MednetsModel:
        """Move parameters to `channels_last` (2D) or `channels_last_3d` (3D) in place."""
        return self.to(memory_format=memory_format_for(self.spatial_dims))
