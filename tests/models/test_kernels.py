"""Kernel workarounds: the bf16 Conv3d workaround, instance norm that keeps channels_last, pooling in
the input's precision under CPU autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mednets.models import create_model
from mednets.models.blocks import conv, max_pool
from mednets.models.kernels import InstanceNorm, average_pool, global_average_pool, instance_norms_as_group_norms

# (stride, batch, [D, H, W]): torch 2.13 on CPU gets the bf16 weight gradient wrong for the first four
# (a side under 4 voxels, batch >= 2; benchmarks/bf16_conv3d_gradients.py); `conv` must not.
SMALL_MAPS = [(1, 2, (2, 8, 8)), (2, 2, (4, 4, 1)), (2, 4, (1, 1, 1)), (2, 2, (3, 1, 4)), (1, 2, (3, 8, 8)),
              (2, 2, (4, 4, 4))]  # fmt: skip


@pytest.mark.parametrize(("stride", "batch", "size"), SMALL_MAPS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_conv3d_weight_gradient_matches_fp32(
    stride: int, batch: int, size: tuple[int, int, int], channels_last: bool
) -> None:
    layer = conv(3, 16, 16, 3, stride=stride, padding=1)
    x = torch.randn(batch, 16, *size)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    gradients = []
    for bf16 in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = layer(x)
        out.float().square().mean().backward()
        gradients.append(layer.weight.grad.clone())
    reference, low = gradients
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max() <= 0.02 * reference.abs().max()


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_conv3d_per_sample_weight_gradient_matches_the_plain_bf16_path(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large maps get their weight gradient one sample at a time (lowered threshold here): same
    outputs and input gradient as the plain bf16 convolution, weight and bias gradients within bf16
    rounding, every gradient in the parameter's or input's own dtype."""
    torch.manual_seed(0)
    layer = conv(3, 8, 6, 3, bias=bias).to(memory_format=torch.channels_last_3d)
    x = torch.randn(3, 8, 6, 6, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    results = []
    for threshold in (10**9, 1):  # plain, then per sample
        monkeypatch.setattr(type(layer), "PER_SAMPLE_WEIGHT_GRAD_ELEMENTS", threshold)
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sin().sum().backward()
        results.append((out, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad))
    (out, grad_x, grad_w, grad_b), (out2, grad_x2, grad_w2, grad_b2) = results
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(grad_x2, grad_x, rtol=0, atol=0)
    assert grad_x2.dtype == x.dtype and grad_w2.dtype == layer.weight.dtype
    assert (grad_w2 - grad_w).abs().max() <= 0.01 * grad_w.abs().max()
    if bias:
        assert (grad_b2 - grad_b).abs().max() <= 0.01 * grad_b.abs().max()


@pytest.mark.parametrize("shape", [(2, 6, 5, 7, 4), (3, 4, 9, 11)])
def test_instance_norm_equals_torch_instance_norm_and_keeps_channels_last(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    reference = {5: nn.InstanceNorm3d, 4: nn.InstanceNorm2d}[len(shape)](shape[1], affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    ours = InstanceNorm(shape[1])
    ours.load_state_dict(reference.state_dict())
    layout = {5: torch.channels_last_3d, 4: torch.channels_last}[len(shape)]
    x = (3 * torch.randn(shape) + 2).contiguous(memory_format=layout)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)  # with gradients: F.instance_norm
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)  # without: group norm
        assert ours(x).is_contiguous(memory_format=layout)


def test_instance_norms_of_a_monai_network_are_swapped_with_their_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Sequential(nn.InstanceNorm3d(4)))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 1, 8, 8, 8)
    expected = model(x)
    swapped = instance_norms_as_group_norms(model)
    assert isinstance(swapped[1], InstanceNorm) and isinstance(swapped[2][0], InstanceNorm)
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in swapped.modules())
    torch.testing.assert_close(swapped(x), expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in create_model("dynunet").modules())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_max_pool_stays_in_bf16_under_cpu_autocast_and_is_exact(spatial_dims: int) -> None:
    # CPU autocast would run max pooling in float32 (a float32 copy of the input, kept for backward).
    layout = {2: torch.channels_last, 3: torch.channels_last_3d}[spatial_dims]
    x = torch.randn(2, 8, *[6] * spatial_dims).bfloat16().contiguous(memory_format=layout).requires_grad_()
    pool = max_pool(spatial_dims, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pool(x)
    assert pooled.dtype == torch.bfloat16
    assert pooled.is_contiguous(memory_format=layout)
    reference = pool(x.detach().float())  # no autocast: the plain float32 kernel
    assert torch.equal(pooled.float(), reference)
    pooled.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.float().sum().item() == reference.numel()


def test_global_average_pool_equals_the_mean_and_its_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, dtype=torch.float64)
    (global_average_pool(x) * weights).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (x.mean(dim=(2, 3, 4)) * weights).sum().backward()
    assert torch.allclose(global_average_pool(x), x.mean(dim=(2, 3, 4)), atol=1e-12)
    assert torch.allclose(ours, x.grad, atol=1e-12)
    # bf16 under CPU autocast: a bf16 result within bf16 rounding of the float32 mean
    features = torch.rand(2, 4, 32, 32, 32) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = global_average_pool(features.bfloat16())
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), features.bfloat16().float().mean(dim=(2, 3, 4)), rtol=4e-3)


@pytest.mark.parametrize(
    ("shape", "rate"), [((2, 3, 12), 2), ((1, 2, 8, 12), 4), ((2, 3, 8, 4, 12), 2), ((1, 2, 9, 8, 7), 2)]
)
def test_average_pool_equals_the_adaptive_pool_with_ceil_sizes_and_its_gradient(
    shape: tuple[int, ...], rate: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    size = [-(-n // rate) for n in shape[2:]]
    adaptive = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[len(shape)]
    assert torch.allclose(average_pool(x, rate), adaptive(x, size), atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: average_pool(v, rate), (x,))  # the strided path's own backward


def test_average_pool_of_bf16_channels_last_rounds_once_and_keeps_dtype_and_layout() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16, 16, 16).to(memory_format=torch.channels_last_3d)
    low = x.bfloat16()
    pooled = average_pool(low, 4)
    reference = F.adaptive_avg_pool3d(low.double(), [4, 4, 4])  # the exact mean of the bf16 values
    assert pooled.dtype == torch.bfloat16 and pooled.shape == (2, 16, 4, 4, 4)
    assert pooled.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(pooled, reference.bfloat16())  # summed in float32, rounded once
