"""Figures of 2D runs: denoising triplets and segmentation overlays, in the format their file name asks for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mednets.reports.sample_figures import denoising_triplets, segmentation_overlays


def test_denoising_triplets_show_every_method(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clean = rng.random((3, 32, 32)).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    sample = {"name": "tile", "noisy": noisy, "clean": clean, "outputs": {"a": clean * 0.9, "b": clean}}
    path = denoising_triplets([sample, sample], tmp_path / "triplets.png")
    width, height = Image.open(path).size
    assert width > height  # 4 columns (noisy, a, b, clean), 2 rows


def test_segmentation_overlays_accept_grey_and_rgb_images(tmp_path: Path) -> None:
    truth = np.zeros((24, 24), np.uint8)
    truth[5:15, 5:15] = 1
    samples = [
        {"name": "grey", "image": np.full((24, 24), 0.5), "truth": truth, "prediction": truth},
        {"name": "rgb", "image": np.full((3, 24, 24), 0.5), "truth": truth, "prediction": np.zeros_like(truth)},
    ]
    assert segmentation_overlays(samples, tmp_path / "overlays.png").is_file()


def test_figures_are_written_in_the_format_of_their_suffix(tmp_path: Path) -> None:
    clean = np.full((3, 16, 16), 0.5, np.float32)
    sample = {"name": "tile", "noisy": clean, "clean": clean, "outputs": {"a": clean}}
    assert Image.open(denoising_triplets([sample], tmp_path / "triplets.jpg")).format == "JPEG"
    assert Image.open(denoising_triplets([sample], tmp_path / "triplets.png")).format == "PNG"
