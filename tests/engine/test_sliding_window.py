"""Sliding-window inference: MONAI's blending reproduced exactly, fast paths close to fp32."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from mednets.engine.sliding_window import importance_map, sliding_window, window_starts
from mednets.errors import ConfigError, InvalidInputError


def _net(dims: int = 3) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, padding=1)).eval()


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((1, 40, 37, 20), (16, 16, 24), 0.5),  # W shorter than the patch: padded and cropped
        ((1, 33, 50, 29), (16, 20, 12), 0.25),
        ((1, 16, 16, 16), (16, 16, 16), 0.5),  # a single window
        ((1, 45, 30), (16, 12), 0.6),  # 2D
    ],
)
def test_equals_monai_gaussian_sliding_window_in_fp32(shape: tuple, patch: tuple, overlap: float) -> None:
    net = _net(len(patch))
    image = torch.rand(shape)
    with torch.no_grad():
        reference = sliding_window_inference(image[None], patch, 2, net, overlap=overlap, mode="gaussian")[0]
    ours = sliding_window(net, image, patch, overlap=overlap, precision="fp32", batch_size=3)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_bf16_channels_last_agrees_with_fp32() -> None:
    net = _net().to(memory_format=torch.channels_last_3d)
    image = torch.rand(1, 40, 36, 28)
    fp32 = sliding_window(net, image, (16, 16, 16), precision="fp32")
    bf16 = sliding_window(net, image, (16, 16, 16), precision="bf16", channels_last=True, batch_size=4)
    assert bf16.dtype == torch.float32
    assert (bf16.argmax(0) == fp32.argmax(0)).float().mean() > 0.97
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_bfloat16_accumulator_is_half_the_memory_and_close_to_float32() -> None:
    net, image = _net(), torch.rand(1, 40, 36, 28)
    full = sliding_window(net, image, (16, 16, 16), precision="fp32")
    half = sliding_window(net, image, (16, 16, 16), precision="fp32", accumulate_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.element_size() * 2 == full.element_size()
    torch.testing.assert_close(half.float(), full, atol=0.02 * float(full.abs().max()), rtol=0)
    assert (half.argmax(0) == full.argmax(0)).float().mean() > 0.97


def test_batch_size_does_not_change_the_result() -> None:
    net, image = _net(), torch.rand(1, 30, 30, 30)
    one = sliding_window(net, image, (16, 16, 16), precision="fp32", batch_size=1)
    many = sliding_window(net, image, (16, 16, 16), precision="fp32", batch_size=7)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


def test_constant_model_output_stays_constant_across_window_borders() -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 2, *x.shape[2:]), 3.0)

    out = sliding_window(Constant(), torch.rand(1, 50, 23, 31), (16, 16, 16), precision="fp32")
    torch.testing.assert_close(out, torch.full_like(out, 3.0))


def test_axes_shorter_than_the_window_are_padded_with_each_channels_fill() -> None:
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:  # the identity, remembering its windows
        seen.append(x.clone())
        return x

    image = torch.rand(2, 16, 10, 16)  # H shorter than the window: 3 rows before, 3 after
    out = sliding_window(record, image, (16, 16, 16), precision="fp32", pad_value=[-5.0, 7.0])
    (window,) = seen
    assert (window[0, 0, :, :3] == -5.0).all() and (window[0, 1, :, -3:] == 7.0).all()
    torch.testing.assert_close(out, image)  # cropped back to the image


def test_window_starts_and_importance_map() -> None:
    assert window_starts(40, 16, 0.5) == [0, 8, 16, 24]
    assert window_starts(37, 16, 0.5) == [0, 8, 16, 21]  # the last window ends at the edge
    assert window_starts(10, 16, 0.5) == [0]
    weights = importance_map((8, 12, 6))
    assert weights.shape == (8, 12, 6) and weights.max() <= 1.0
    assert weights[4, 6, 3] == weights.max() > 10 * weights[0, 0, 0]  # peaks in the middle
    assert weights.min() >= 1e-3
    assert importance_map((8, 12, 6)) is weights  # cached


def test_bad_arguments_raise_typed_errors() -> None:
    net = _net()
    with pytest.raises(InvalidInputError, match="patch size"):
        sliding_window(net, torch.rand(1, 8, 8, 8), (4, 4))
    with pytest.raises(ConfigError, match="overlap"):
        sliding_window(net, torch.rand(1, 8, 8, 8), (4, 4, 4), overlap=1.0)
    with pytest.raises(ConfigError, match="precision"):
        sliding_window(net, torch.rand(1, 8, 8, 8), (4, 4, 4), precision="fp16")
    with pytest.raises(InvalidInputError, match="one tensor"):
        sliding_window(lambda x: {"logits": x}, torch.rand(1, 8, 8, 8), (4, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_with_cpu_accumulator_matches_cpu() -> None:
    net, image = _net(), torch.rand(1, 40, 36, 28)
    cpu = sliding_window(net, image, (16, 16, 16), precision="fp32")
    cuda = sliding_window(net.cuda(), image, (16, 16, 16), precision="fp32", accumulate_device="cpu")
    assert cuda.device.type == "cpu"
    torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=0)
