"""MednetsModel.run_cheap_tail: a branch's cheap tail recomputed in backward, same numbers, less stored."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mednets.models.base import MednetsModel


class _Branch(MednetsModel):
    """conv 3x3x3 -> batch norm -> ReLU -> 1x1x1 projection (SADAAn's attention branches in small)."""

    spatial_dims = 3

    def __init__(self, recompute: bool) -> None:
        super().__init__()
        self.recompute = recompute
        self.layers = nn.Sequential(
            nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(inplace=True), nn.Conv3d(6, 2, 1)
        )
        self.projection = nn.Parameter(torch.randn(4, 2, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        then = lambda y: F.conv3d(y, self.projection)  # noqa: E731
        if self.recompute:
            return self.run_cheap_tail(self.layers, x, tail_start=1, then=then)
        return then(self.layers(x))


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(saved.values()), out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cheap_tail_gives_equal_outputs_gradients_and_statistics_and_stores_less(checkpointing: bool) -> None:
    torch.manual_seed(0)
    plain = _Branch(recompute=False).double().train()
    tail = copy.deepcopy(plain)
    tail.recompute = True
    tail.set_gradient_checkpointing(checkpointing)
    x = torch.randn(2, 3, 6, 6, 6, dtype=torch.float64)

    plain_bytes, plain_out = _saved_bytes(plain, x)
    tail_bytes, tail_out = _saved_bytes(tail, x)
    plain_out.square().sum().backward()
    tail_out.square().sum().backward()

    torch.testing.assert_close(tail_out, plain_out, rtol=0, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), tail.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10, msg=f"gradient of {name} differs")
    for (name, b), c in zip(plain.named_buffers(), tail.buffers(), strict=True):  # running stats updated once
        torch.testing.assert_close(c, b, rtol=0, atol=1e-12, msg=f"buffer {name} differs")
    assert tail_bytes < plain_bytes
    # without checkpointing the ReLU output (6 channels) is what is no longer stored
    if not checkpointing:
        assert plain_bytes - tail_bytes >= x[:, :1].numel() * 6 * 8


def test_cheap_tail_without_gradients_is_the_plain_call() -> None:
    torch.manual_seed(0)
    model = _Branch(recompute=True).eval()
    x = torch.randn(1, 3, 4, 4, 4)
    with torch.no_grad():
        expected = F.conv3d(model.layers(x), model.projection)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
