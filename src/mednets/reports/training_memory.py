"""Where a training step's memory goes: weights, gradients, optimizer state and activations per stage.

Weights, gradients and the optimizer state follow from the parameters: the weights (parameters and
buffers), one fp32 gradient per trainable parameter, and Adam's (AdamW's) two fp32 moments per
trainable parameter. Activations are counted, not estimated: during one training-mode forward pass,
`torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd saves for the backward pass;
each distinct storage is counted once (views share it), parameters and buffers are left out (they
are the weights), and the bytes go to the top-level stage (direct child of the model, or of its only
child for a wrapper) whose forward saved the tensor first, or to the model's own operations outside
any stage. The sum of the parts is checked against the measured peak of live tensors in a second
Adam step (`measure.tensor_peak_mb`; the first step creates the optimizer state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mednets.reports.measure import tensor_peak_mb

__all__ = ["ACTIVATION_METHOD", "OWN_OPERATIONS", "SPLIT_TOLERANCE", "TrainingMemory", "adam_step",
           "saved_activation_bytes", "surrogate_loss", "training_memory"]  # fmt: skip

OWN_OPERATIONS = "(model's own operations)"
# How far the measured tensor peak of a training step may lie from the sum of the parts, as a share of
# the sum: backward and optimizer temporaries add to it, activations freed while gradients are made take
# from it (measured: -8% to +24% on the registry's tiny builds, +0% to +13% at working sizes, 2D and 3D UNets,
# DynUNet, LHA-Net, SADAAn, the autoencoders). The report flags a split outside it.
SPLIT_TOLERANCE = 0.3
ACTIVATION_METHOD = (
    "activations: bytes of the distinct tensors autograd saves for the backward pass in one training-mode "
    "forward (torch.autograd.graph.saved_tensors_hooks), parameters and buffers excluded, each counted in the "
    "top-level stage whose forward saved it first; measured peak: live tensors during the second Adam step "
    "(torch's MemTracker)"
)
_MB = 2**20


@dataclass
class TrainingMemory:
    """The memory of one fp32 training step with Adam, in MB, split into its parts.

    Attributes:
        weights_mb: parameters and buffers.
        gradients_mb: one gradient per trainable parameter.
        optimizer_mb: Adam's two moments per trainable parameter (fp32).
        activations: `(stage, MB)` saved for the backward pass, in call order (`saved_activation_bytes`).
        measured_peak_mb: the measured peak of live tensors in a training step (`measure.tensor_peak_mb`),
            or None when not measured.
    """

    weights_mb: float
    gradients_mb: float
    optimizer_mb: float
    activations: list[tuple[str, float]] = field(default_factory=list)
    measured_peak_mb: float | None = None

    @property
    def activations_mb(self) -> float:
        return sum(mb for _, mb in self.activations)

    @property
    def total_mb(self) -> float:
        """Weights + gradients + optimizer state + activations."""
        return self.weights_mb + self.gradients_mb + self.optimizer_mb + self.activations_mb

    @property
    def measured_over_total(self) -> float | None:
        """Measured peak / sum of the parts (None when the peak was not measured)."""
        return None if self.measured_peak_mb is None else self.measured_peak_mb / self.total_mb

    @property
    def within_tolerance(self) -> bool | None:
        """Whether the measured peak lies within `SPLIT_TOLERANCE` of the sum of the parts."""
        ratio = self.measured_over_total
        return None if ratio is None else abs(ratio - 1) <= SPLIT_TOLERANCE

    def rows(self) -> list[list[str]]:
        """The split as table rows: part, MB, share of the sum (the report's training-memory table)."""
        parts = [("Weights (parameters and buffers, fp32)", self.weights_mb), ("Gradients (fp32)", self.gradients_mb),
                 ("Optimizer state (Adam/AdamW: 2 moments, fp32)", self.optimizer_mb),
                 ("Activations saved for backward", self.activations_mb)]  # fmt: skip
        rows = [[name, f"{mb:.1f}", f"{100 * mb / self.total_mb:.1f}%"] for name, mb in parts]
        rows.append(["Sum of the parts", f"{self.total_mb:.1f}", "100.0%"])
        if self.measured_peak_mb is not None:
            verdict = "within" if self.within_tolerance else "outside"
            rows.append([f"Measured peak of live tensors in a training step ({verdict} +/-{SPLIT_TOLERANCE:.0%} of the sum)",
                         f"{self.measured_peak_mb:.1f}", f"{100 * self.measured_over_total:.1f}%"])  # fmt: skip
        return rows

    def stage_rows(self) -> list[list[str]]:
        """Activations per stage as table rows: stage, MB, share of the activations."""
        total = self.activations_mb or 1.0
        return [[name, f"{mb:.2f}", f"{100 * mb / total:.1f}%"] for name, mb in self.activations]

    def sections(self) -> list[tuple[str, str, tuple[list[str], list[list[str]]]]]:
        """The model report's sections of the split, as (title, text, (header, rows))."""
        return [("Training memory (one Adam step, fp32)", "", (["Part", "MB", "Share"], self.rows())),
                ("Activations saved for backward, per stage", "", (["Stage", "MB", "Share"], self.stage_rows()))]  # fmt: skip


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's direct children, or those of its only child for a wrapper (MONAI's DynUNet: `net.*`)."""
    prefix = ""
    while len(children := list(model.named_children())) == 1:
        name, model = children[0]
        prefix += f"{name}."
    return [(prefix + name, child) for name, child in children]


def surrogate_loss(outputs: Any) -> torch.Tensor:
    """A scalar depending on every floating output (tensor, dict or list): their means, summed."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().mean() if outputs.is_floating_point() else outputs.new_zeros((), dtype=torch.float32)
    items = outputs.values() if isinstance(outputs, dict) else outputs
    return sum((surrogate_loss(item) for item in items), torch.zeros(()))


def adam_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """An Adam optimizer of `model` and one training step on `x` `[B, C, *S]` with the surrogate loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        surrogate_loss(model(x)).backward()
        optimizer.step()

    return optimizer, step


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


def training_memory(model: nn.Module, x: torch.Tensor, *, measure: bool = True) -> TrainingMemory:
    """The split of one Adam training step of `model` on `x` `[B, C, *S]` (same device), and its measured peak.

    The model is put in training mode and, with `measure`, trained two steps (the first creates the
    optimizer state, the second is measured): pass a model built for this.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    activations = saved_activation_bytes(model.train(), x)
    peak = None
    if measure:
        optimizer, step = adam_step(model, x)
        step()
        peak = tensor_peak_mb(step, model, optimizer, x)
    return TrainingMemory(weights_mb=weights / _MB, gradients_mb=trainable * 4 / _MB, optimizer_mb=2 * trainable * 4 / _MB,
                          activations=[(name, size / _MB) for name, size in activations], measured_peak_mb=peak)  # fmt: skip
