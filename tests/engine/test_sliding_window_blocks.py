"""`sliding_window_blocks`: seamless blending of an image read region by region equals `sliding_window` on it whole."""

from __future__ import annotations

import pytest
import torch

from mednets.engine.sliding_window import sliding_window, sliding_window_blocks
from mednets.models import create_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("histo_autoencoder", base_channels=4).eval()


def assemble(blocks: list[tuple[int, int, torch.Tensor]], shape: tuple[int, int]) -> torch.Tensor:
    """The blocks put in place; each pixel must come exactly once."""
    out = torch.full((3, *shape), float("nan"))
    count = torch.zeros(shape, dtype=torch.int)
    for top, left, block in blocks:
        out[:, top : top + block.shape[1], left : left + block.shape[2]] = block
        count[top : top + block.shape[1], left : left + block.shape[2]] += 1
    assert (count == 1).all()
    return out


@pytest.mark.parametrize("shape", [(150, 210), (40, 210), (150, 30), (64, 64), (20, 25)])
@pytest.mark.parametrize(
    ("batch_size", "precision", "read_width"), [(1, "fp32", 64), (3, "bf16", 100), (16, "bf16", 1024)]
)
def test_blocks_blend_bit_for_bit_like_the_whole_image(
    model: torch.nn.Module, shape: tuple[int, int], batch_size: int, precision: str, read_width: int
) -> None:
    """Taller, shorter, narrower than a window, one window, smaller; batches within and across rows of windows."""
    image = torch.rand(3, *shape)
    options = {"overlap": 0.25, "size_multiple": 16, "batch_size": batch_size, "precision": precision}
    whole = sliding_window(model, image, (64, 64), weights="seamless", **options)
    reads: list[tuple[int, int, int, int]] = []

    def read_region(top: int, left: int, height: int, width: int) -> torch.Tensor:
        reads.append((top, left, height, width))
        return image[:, top : top + height, left : left + width]

    blocks = list(sliding_window_blocks(model, read_region, shape, (64, 64), read_width=read_width, **options))
    assert torch.equal(assemble(blocks, shape), whole)
    assert [block[0] for block in blocks] == sorted(block[0] for block in blocks)  # band by band, top to bottom
    assert all(top + height <= shape[0] and left + width <= shape[1] for top, left, height, width in reads)


def test_memory_held_follows_a_row_of_windows_not_the_image(model: torch.nn.Module) -> None:
    """A tall, wide image: every read and every block stays within a row of windows and a read's width."""
    image = torch.rand(3, 700, 900)
    reads: list[tuple[int, int]] = []

    def read_region(top: int, left: int, height: int, width: int) -> torch.Tensor:
        reads.append((height, width))
        return image[:, top : top + height, left : left + width]

    blocks = list(sliding_window_blocks(model, read_region, (700, 900), (64, 64), overlap=0.25, size_multiple=16,
                                        batch_size=2, precision="fp32", read_width=128))  # fmt: skip
    assert max(height for height, _ in reads) <= 64 and max(width for _, width in reads) <= 128
    assert max(block.shape[1] for _, _, block in blocks) <= 64 and max(block.shape[2] for _, _, block in blocks) <= 128
    assert torch.equal(assemble(blocks, (700, 900)), sliding_window(model, image, (64, 64), overlap=0.25,
                       weights="seamless", size_multiple=16, batch_size=2, precision="fp32"))  # fmt: skip
