"""Denoising whole slides: one level streamed tile by tile into a pyramidal TIFF, equal to denoising it in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mednets.data.pyramid import pyramid_shapes, write_pyramid
from mednets.data.wsi import open_slide
from mednets.engine.denoise import denoise_image, denoise_paths, denoise_slide
from mednets.models import create_model

OPTIONS = {"patch_size": 64, "overlap": 0.25, "batch_size": 3, "size_multiple": 16, "precision": "bf16"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """An untrained tiny autoencoder: equality of the two paths needs no training."""
    torch.manual_seed(0)
    return create_model("histo_autoencoder", base_channels=4).eval()


def tissue(height: int, width: int, seed: int = 0) -> np.ndarray:
    rows, columns = np.mgrid[0:height, 0:width]
    base = 150 + 60 * np.sin(columns / 23.0) * np.cos(rows / 31.0)
    noisy = np.stack([base, base - 30, base + 20], axis=-1) + np.random.default_rng(seed).normal(
        0, 12, (height, width, 3)
    )
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_streamed_level_equals_the_level_denoised_in_memory(model: torch.nn.Module, tmp_path: Path) -> None:
    image = tissue(520, 700)
    slide = write_pyramid(tmp_path / "slide.tif", (image[r : r + 100] for r in range(0, 520, 100)), image.shape,
                          tile_size=64, mpp=0.25, magnification=40)  # fmt: skip
    with open_slide(slide) as source:
        level1 = source.read_rows(1, 0, 260)  # 20x
    out = denoise_slide(model, slide, tmp_path / "out.tif", magnification=20, tile_size=48, compression="deflate",
                        **OPTIONS)  # fmt: skip
    with open_slide(out) as denoised:
        assert [level.shape for level in denoised.levels] == pyramid_shapes(260, 350, 48)
        assert all(level.tile_shape == (48, 48) for level in denoised.levels)
        assert denoised.levels[0].mpp == pytest.approx(0.5)
        assert denoised.levels[0].magnification == pytest.approx(20)
        streamed = denoised.read_rows(0, 0, 260)
    np.testing.assert_array_equal(streamed, denoise_image(model, level1, **OPTIONS))  # bit for bit, bf16 and all
    assert not np.array_equal(streamed, level1)


def test_a_jpeg_svs_is_written_back_with_jpeg_tiles(model: torch.nn.Module, tmp_path: Path) -> None:
    image = tissue(200, 260)
    path = tmp_path / "slide.svs"
    with tifffile.TiffWriter(path) as tif:  # Aperio layout: baseline, thumbnail
        tif.write(
            image,
            tile=(64, 64),
            photometric="rgb",
            compression="jpeg",
            metadata=None,
            description="Aperio Image Library v12.0.0 \n260x200 (64x64) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5",
        )
        tif.write(image[::4, ::4], photometric="rgb", compression="jpeg", metadata=None)
    out = denoise_slide(model, path, tmp_path / "slide.tif", **OPTIONS)
    with open_slide(path) as source, open_slide(out) as denoised:
        assert denoised.levels[0].compression == "jpeg" and denoised.levels[0].magnification == pytest.approx(20)
        expected = denoise_image(model, source.read_rows(0, 0, 200), **OPTIONS)
        assert np.abs(denoised.read_rows(0, 0, 200).astype(int) - expected).mean() < 2  # JPEG's loss only


def test_denoise_paths_streams_slides_and_keeps_other_images(model: torch.nn.Module, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = tissue(150, 200)
    write_pyramid(inputs / "slide.tif", [image], image.shape, tile_size=32, mpp=0.5, magnification=20)
    Image.fromarray(image[:40, :40]).save(inputs / "tile.png")
    result = denoise_paths(model, inputs, tmp_path / "out", progress=False, **OPTIONS)
    assert sorted(p.name for p in result["written"]) == ["slide.tif", "tile.png"] and not result["failed"]
    with open_slide(tmp_path / "out" / "slide.tif") as slide:
        assert len(slide.levels) == len(pyramid_shapes(150, 200, 256))
    result = denoise_paths(model, inputs, tmp_path / "low", progress=False, level=1, tile_size=32, **OPTIONS)
    assert [p.name for p in result["written"]] == ["slide.tif"]
    assert [item[0] for item in result["failed"]] == [str(inputs / "tile.png")]
    assert "not a whole-slide image" in result["failed"][0][1]
    with open_slide(tmp_path / "low" / "slide.tif") as slide:
        assert slide.levels[0].shape == (75, 100) and slide.levels[0].magnification == pytest.approx(10)


def test_real_svs_is_denoised_and_a_corrupt_one_reported(
    model: torch.nn.Module, real_slides: Path, tmp_path: Path
) -> None:
    result = denoise_paths(model, real_slides, tmp_path / "out", progress=False, **OPTIONS)
    assert [p.name for p in result["written"]] == ["small.tif"]
    assert [item[0] for item in result["failed"]] == [str(real_slides / "unreadable.svs")]
    assert "cannot decode" in result["failed"][0][1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["small.tif"]  # nothing half-written
    with open_slide(tmp_path / "out" / "small.tif") as slide:
        assert slide.levels[0].shape == (16, 16) and slide.levels[0].compression == "jpeg"
        assert slide.levels[0].mpp == pytest.approx(0.499) and slide.levels[0].magnification == pytest.approx(20)
