"""Whole-slide images (mednets.data.wsi): levels, level choice by magnification or mpp, regions, corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from mednets.data.io import read_image_2d
from mednets.data.wsi import choose_level, is_slide, open_slide
from mednets.errors import ConfigError, InvalidInputError


def tissue(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth "stained tissue" with a little noise: ``[H, W, C]`` uint8 that JPEG keeps close."""
    rows, columns = np.mgrid[0:height, 0:width]
    base = 150 + 60 * np.sin(columns / 23.0) * np.cos(rows / 31.0)
    shades = np.stack([base - 10 * k for k in range(channels)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 2, shades.shape)
    return np.clip(shades + noise, 0, 255).astype(np.uint8)


def write_svs(path: Path, image: np.ndarray, *, compression: str | int = "jpeg", downsamples: tuple[int, ...] = (4,),
              mpp: float = 0.25, power: float = 40, tile: int = 64) -> Path:  # fmt: skip
    """An Aperio-style SVS: tiled baseline, a striped thumbnail, then tiled levels (every `downsamples` step)."""
    height, width = image.shape[:2]
    description = (f"Aperio Image Library v12.0.0 \n{width}x{height} ({tile}x{tile}) JPEG/RGB Q=90"
                   f"|AppMag = {power:g}|MPP = {mpp}")  # fmt: skip
    options = {"photometric": "rgb", "compression": compression, "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(tile, tile), description=description, **options)
        tif.write(image[::8, ::8], description="Aperio Image Library v12.0.0 \nthumbnail", **options)
        for step in downsamples:
            tif.write(image[::step, ::step], tile=(tile, tile), description="Aperio Image Library v12.0.0", **options)
    return path


def test_jpeg_svs_lists_levels_with_downsample_mpp_and_magnification(tmp_path: Path) -> None:
    image = tissue(400, 520)
    with open_slide(write_svs(tmp_path / "slide.svs", image, downsamples=(4, 16))) as slide:
        assert slide.vendor == "aperio" and slide.channels == 3 and slide.dtype == np.uint8
        assert [level.shape for level in slide.levels] == [(400, 520), (100, 130), (25, 33)]
        level = slide.levels[1]
        assert level.downsample == pytest.approx(4.0) and level.mpp == pytest.approx(1.0)
        assert level.magnification == pytest.approx(10.0)
        assert level.tile_shape == (64, 64) and level.compression == "jpeg"
        assert slide.levels[2].downsample == pytest.approx((520 / 33 + 400 / 25) / 2)


def test_a_level_is_chosen_by_index_magnification_or_mpp(tmp_path: Path) -> None:
    with open_slide(write_svs(tmp_path / "slide.svs", tissue(256, 256), downsamples=(4,))) as slide:
        assert choose_level(slide).index == 0
        assert choose_level(slide, level=1).index == 1
        assert choose_level(slide, magnification=10).index == 1
        assert choose_level(slide, magnification=40).index == 0
        assert choose_level(slide, mpp=1.0).index == 1
        with pytest.raises(InvalidInputError, match=r"no level at 20x") as caught:
            choose_level(slide, magnification=20)  # between 40x and 10x: mednets does not resample
        assert "level 0: 40x" in str(caught.value) and "level 1: 10x" in str(caught.value)
        with pytest.raises(InvalidInputError, match="no such level"):
            choose_level(slide, level=2)
        with pytest.raises(ConfigError, match="one way"):
            choose_level(slide, level=0, magnification=40)


def test_a_slide_without_magnification_says_so(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, tissue(64, 64), tile=(32, 32), photometric="rgb")
    with open_slide(path) as slide, pytest.raises(InvalidInputError, match="does not record its magnification"):
        choose_level(slide, magnification=20)


@pytest.mark.parametrize(("compression", "tolerance"), [(None, 0), (33005, 0), ("jpeg2000", 0), ("jpeg", 3)])
def test_regions_equal_the_pixels_written(tmp_path: Path, compression: str | int | None, tolerance: float) -> None:
    """Uncompressed and lossless JPEG 2000 (Aperio's 33005 and TIFF's own) exactly; JPEG within its loss."""
    image = tissue(300, 410)
    path = write_svs(tmp_path / "slide.svs", image, compression=compression or "none", downsamples=(2,))
    with open_slide(path) as slide:
        region = slide.read_region(0, 37, 101, 150, 205)
        assert region.shape == (150, 205, 3)
        error = np.abs(region.astype(int) - image[37:187, 101:306])
        assert error.mean() <= tolerance and error.max() <= 8 * tolerance
        low = slide.read_region(1, 10, 20, 50, 60)  # level coordinates, not level 0's
        expected = image[::2, ::2][10:60, 20:80]
        assert np.abs(low.astype(int) - expected).mean() <= tolerance
        assert slide.levels[0].compression == ("none" if compression is None else "jpeg" if compression == "jpeg"
                                                 else "jpeg2000")  # fmt: skip
        with pytest.raises(InvalidInputError, match="region outside level 1"):
            slide.read_region(1, 100, 0, 60, 10)


def test_subifd_pyramid_and_grey_slides_are_read(tmp_path: Path) -> None:
    grey = tissue(256, 320, channels=1)[..., 0]
    path = tmp_path / "grey.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(grey, tile=(64, 64), subifds=1, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        tif.write(grey[::2, ::2], tile=(64, 64), subfiletype=1)
    assert is_slide(path)
    with open_slide(path) as slide:
        assert slide.channels == 1 and [level.shape for level in slide.levels] == [(256, 320), (128, 160)]
        assert slide.levels[1].mpp == pytest.approx(1.0)
        np.testing.assert_array_equal(slide.read_region(1, 5, 6, 40, 50)[..., 0], grey[::2, ::2][5:45, 6:56])


def test_real_jpeg_svs_from_openslide_is_read(real_slides: Path) -> None:
    path = real_slides / "small.svs"
    assert is_slide(path)
    with open_slide(path) as slide:
        assert slide.vendor == "aperio" and [level.shape for level in slide.levels] == [(16, 16)]
        level = choose_level(slide, magnification=20)
        assert level.mpp == pytest.approx(0.499) and level.compression == "jpeg"
        region = slide.read_region(0, 0, 0, 16, 16)
    assert region.shape == (16, 16, 3) and region.dtype == np.uint8
    assert 200 < region.mean() < 255  # a near-white corner of CMU-1, decoded (not zeros)


def test_real_jpeg_svs_level0_reads_through_the_format_table(real_slides: Path) -> None:
    """The JPEG tiles of a real SVS decode in `read_image_2d` too (they needed imagecodecs, issue 23)."""
    path = real_slides / "small.svs"
    with open_slide(path) as slide:
        expected = slide.read_region(0, 0, 0, 16, 16)
    np.testing.assert_array_equal(read_image_2d(path).array, expected)


def test_a_real_slide_with_a_broken_tile_gives_a_typed_error(real_slides: Path) -> None:
    with open_slide(real_slides / "unreadable.svs") as slide, pytest.raises(InvalidInputError, match="cannot decode"):
        slide.read_region(0, 0, 0, 16, 16)


def test_corrupt_truncated_and_foreign_files_give_typed_errors(tmp_path: Path) -> None:
    whole = write_svs(tmp_path / "whole.svs", tissue(256, 256)).read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidInputError, match=r"truncated\.svs: .*truncated"):
        open_slide(truncated)
    (tmp_path / "notes.svs").write_text("not a slide")
    with pytest.raises(InvalidInputError, match=r"notes\.svs: cannot open slide"):
        open_slide(tmp_path / "notes.svs")
    with pytest.raises(InvalidInputError, match="file not found"):
        open_slide(tmp_path / "missing.svs")


def test_only_slides_and_tiled_pyramids_count_as_slides(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 32, 32), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "tiled.tif", np.zeros((64, 64, 3), np.uint8), tile=(32, 32), photometric="rgb")
    write_svs(tmp_path / "slide.svs", tissue(128, 128))
    assert not is_slide(tmp_path / "stack.tif") and not is_slide(tmp_path / "tiled.tif")
    assert is_slide(tmp_path / "slide.svs") and not is_slide(tmp_path / "slide.png")
