"""MednetsModel.run_cheap_tail and the fused norm -> ReLU -> 1x1 tail: same numbers, less stored."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mednets.models.base import MednetsModel
from mednets.models.kernels import InstanceNorm, norm_relu_project

NORMS = {"batch": lambda: nn.BatchNorm3d(6), "instance": lambda: InstanceNorm(6), "group": lambda: nn.GroupNorm(3, 6)}


class _Branch(MednetsModel):
    """Two branches in small, as in SADAAn: conv 3x3x3 -> norm -> ReLU -> 1x1x1 projection -> sigmoid
    (attention), and conv 3x3x3 -> norm -> ReLU with a separate bias-free projection (segmentation)."""

    spatial_dims = 3

    def __init__(self, recompute: bool, norm_kind: str) -> None:
        super().__init__()
        self.recompute = recompute
        self.gate = nn.Sequential(
            nn.Conv3d(3, 6, 3, padding=1), NORMS[norm_kind](), nn.ReLU(inplace=True), nn.Conv3d(6, 2, 1), nn.Sigmoid()
        )
        self.refine = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), NORMS[norm_kind](), nn.ReLU(inplace=True))
        self.projection = nn.Conv3d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recompute:
            gated = self.run_cheap_tail(self.gate, x, tail_start=1)
            projected = self.run_cheap_tail(self.refine, x, 1, self.projection, projection_bias=False)
            return gated, projected
        return self.gate(x), nn.functional.conv3d(self.refine(x), self.projection.weight)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, tuple[torch.Tensor, ...]]:
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(saved.values()), out


def _twins(norm_kind: str, checkpointing: bool = False) -> tuple[_Branch, _Branch]:
    torch.manual_seed(0)
    plain = _Branch(recompute=False, norm_kind=norm_kind).double().train()
    for p in plain.parameters():  # non-trivial affine parameters
        p.data.add_(0.1 * torch.randn_like(p))
    tail = copy.deepcopy(plain)
    tail.recompute = True
    tail.set_gradient_checkpointing(checkpointing)
    return plain, tail


def _loss(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return outputs[0].square().sum() + outputs[1].sin().sum()


@pytest.mark.parametrize("norm_kind", list(NORMS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cheap_tail_gives_equal_outputs_gradients_and_statistics_and_stores_less(
    norm_kind: str, checkpointing: bool
) -> None:
    plain, tail = _twins(norm_kind, checkpointing)
    x = torch.randn(2, 3, 6, 6, 6, dtype=torch.float64)

    plain_bytes, plain_out = _saved_bytes(plain, x)
    tail_bytes, tail_out = _saved_bytes(tail, x)
    _loss(plain_out).backward()
    _loss(tail_out).backward()

    for got, expected in zip(tail_out, plain_out, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), tail.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10, msg=f"gradient of {name} differs")
    # the tail ran twice (two branches), so batch-norm statistics moved twice in both models
    for (name, b), c in zip(plain.named_buffers(), tail.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=1e-12, msg=f"buffer {name} differs")
    assert tail_bytes < plain_bytes
    if not checkpointing:  # at least the normalised and the activated maps (6 channels) are not stored
        assert plain_bytes - tail_bytes >= x[:, :1].numel() * 6 * 8


def test_fused_tail_matches_autograd_in_eval_mode_batch_norm() -> None:
    """Running statistics instead of batch statistics (a frozen norm being fine-tuned)."""
    torch.manual_seed(0)
    norm = nn.BatchNorm3d(5).double().eval()
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 5, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, b: norm_relu_project(x, norm, w, b), (x, weight, bias))


def test_fused_tail_passes_gradcheck_with_batch_statistics() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4).double().train()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: norm_relu_project(x, norm, w, None), (x, weight))


@pytest.mark.parametrize("norm_kind", ["batch", "instance"])
def test_fused_tail_under_bf16_autocast_matches_autograds_bf16_path(norm_kind: str) -> None:
    plain, tail = _twins(norm_kind)
    plain, tail = plain.float(), tail.float()
    x = torch.randn(2, 3, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", torch.bfloat16):
        expected, outputs = plain(x), tail(x)
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    _loss(expected).backward()
    _loss(outputs).backward()
    for (name, p), q in zip(plain.named_parameters(), tail.parameters(), strict=True):
        if p.grad is None:  # the bias the bias-free projection leaves out
            assert q.grad is None, name
            continue
        error = (q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert error < 1e-2, f"gradient of {name}: relative error {error:.2e}"


def test_cheap_tail_without_gradients_is_the_plain_call() -> None:
    torch.manual_seed(0)
    model = _Branch(recompute=True, norm_kind="batch").eval()
    x = torch.randn(1, 3, 4, 4, 4)
    with torch.no_grad():
        got = model(x)
        torch.testing.assert_close(got[0], model.gate(x), rtol=0, atol=0)
        expected = nn.functional.conv3d(model.refine(x), model.projection.weight)
        torch.testing.assert_close(got[1], expected, rtol=0, atol=0)


def test_cheap_tail_needs_a_relu_and_an_unambiguous_projection() -> None:
    model = _Branch(recompute=True, norm_kind="batch")
    x = torch.randn(1, 3, 4, 4, 4)
    with pytest.raises(TypeError, match="ReLU"):
        model.run_cheap_tail(model.gate, x, tail_start=0)
    with pytest.raises(TypeError, match="end with the ReLU"):
        model.run_cheap_tail(model.gate, x, 1, model.projection)


def test_fused_tail_rejects_other_norms() -> None:
    with pytest.raises(TypeError, match="GroupNorm"):
        norm_relu_project(torch.randn(1, 4, 2, 2), nn.GroupNorm(2, 4), torch.randn(2, 4, 1, 1))
