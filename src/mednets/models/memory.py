"""What a model's training step keeps in memory, counted on the model itself (no files, no loop).

`saved_activation_bytes` counts the bytes autograd saves for the backward pass in one forward, per
top-level stage: the report's memory split (`mednets.reports.training_memory`) and the planner's
patch size (`mednets.engine.planning`) both start from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["OWN_OPERATIONS", "saved_activation_bytes"]

OWN_OPERATIONS = "(model's own operations)"


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's direct children, or those of its only child for a wrapper (MONAI's DynUNet: `net.*`)."""
    prefix = ""
    while len(children := list(model.named_children())) == 1:
        name, model = children[0]
        prefix += f"{name}."
    return [(prefix + name, child) for name, child in children]


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> list[tuple[str, int]]:
    """Bytes autograd saves for the backward pass in one forward of `model(x)`, per top-level stage.

    The model runs as it is (put it in training mode first); nothing is backpropagated.

    Args:
        model: the model; its direct children are the stages.
        x: `[B, C, *S]` input.

    Returns:
        `(stage, bytes)` in call order, then `OWN_OPERATIONS` when the model saves tensors outside its stages.
    """
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    counted: dict[str, int] = {}
    active: list[str] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in weights:
            seen.add(key)
            stage = active[-1] if active else OWN_OPERATIONS
            counted[stage] = counted.get(stage, 0) + storage.nbytes()
        return tensor  # kept by the graph as usual: addresses stay unique while it lives

    def enter(name: str) -> Any:
        return lambda module, inputs: active.append(name)  # returns None: the inputs stay

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        active.pop()

    stages = _stages(model)
    handles = []
    for name, child in stages:
        handles += [child.register_forward_pre_hook(enter(name)), child.register_forward_hook(leave)]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs: Any = model(x)
        del outputs
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name, _ in stages] + [OWN_OPERATIONS]
    return [(name, counted[name]) for name in order if counted.get(name)]
