"""Measurement utilities: FLOPs by formula, peak memory of a known allocation."""

from __future__ import annotations

import torch

from mednets.reports.measure import count_flops, median_time, run_measured


def test_conv2d_flops_match_the_formula() -> None:
    batch, c_in, c_out, kernel, height, width = 2, 3, 8, (3, 5), 17, 23
    layer = torch.nn.Conv2d(c_in, c_out, kernel, padding=(1, 2))
    x = torch.randn(batch, c_in, height, width)
    expected = 2 * batch * c_out * height * width * c_in * kernel[0] * kernel[1]
    assert count_flops(layer, x) == expected


def test_conv3d_strided_flops_match_the_formula() -> None:
    layer = torch.nn.Conv3d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(1, 4, 9, 10, 11)
    out = layer(x).shape[2:]
    assert count_flops(layer, x) == 2 * 6 * out.numel() * 4 * 27


class ExpandedParameter(torch.nn.Module):
    """Returns a view of a parameter, as SADAAn's position prior does: under no_grad it needs grad yet has no grad_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.prior = torch.nn.Parameter(torch.zeros(1, 3, 4))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x @ x.T, "prior": self.prior.expand(x.shape[0], 3, 4)}


def test_flops_of_a_model_returning_a_parameter_view() -> None:
    model = ExpandedParameter()
    assert count_flops(model, torch.randn(2, 5)) == 2 * 2 * 2 * 5
    assert model.prior.requires_grad  # restored afterwards


def allocate_megabytes(megabytes: int) -> float:
    block = torch.ones(megabytes, 2**18)  # 2**18 float32 = 1 MiB per row
    return float(block[0, 0])


def test_peak_memory_of_a_known_allocation() -> None:
    measured = run_measured(allocate_megabytes, 200)
    assert measured.value == 1.0
    assert 195 <= measured.peak_mb <= 260


def test_median_time_runs_warmup_plus_repeats() -> None:
    calls = []
    seconds = median_time(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and seconds >= 0
