"""Peak memory of denoising a whole slide streamed (`denoise_slide`) against the whole level in memory.

For each size (width x height; default 2048 x 2048, 8192 x 8192, and 2048 x 8192 to show that the
height costs no memory) a synthetic slide is written first: smooth "tissue" with noise,
JPEG tiles of 256, a pyramid (`mednets.data.pyramid.write_pyramid`, fed band by band). Each row then
denoises level 0 in a fresh child process (`mednets.reports.measure.run_measured`: peak resident
memory above the child's start-up baseline of Python and torch) with a histo_autoencoder of random
weights (``--base-channels``, 8 by default, so that an 8k slide takes a minute on two cores) at the
`mednets denoise` defaults (windows of 256, overlap 0.25, 4 per batch, bf16):

- ``streamed``: `denoise_slide`, row bands in, tiles out;
- ``in memory``: the level read whole, `denoise_image`, the result written by the same writer.

Both write deflate tiles, and the table says whether their pixels are equal.

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/wsi_streaming.py [--sizes 2048x2048 8192x8192]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mednets.data.pyramid import write_pyramid
from mednets.data.wsi import open_slide
from mednets.engine.denoise import denoise_image, denoise_slide
from mednets.models import create_model
from mednets.reports.measure import machine_description, run_measured

OPTIONS = {"patch_size": 256, "overlap": 0.25, "batch_size": 4, "size_multiple": 16, "precision": "bf16"}


def tissue_bands(width: int, height: int, rows: int = 256) -> Iterator[np.ndarray]:
    """A synthetic H&E-like slide ``[height, width, 3]`` uint8, band by band (never whole in memory)."""
    rng = np.random.default_rng(0)
    columns = np.arange(width)
    for top in range(0, height, rows):
        y = np.arange(top, min(top + rows, height))[:, None]
        base = 170 + 50 * np.sin(columns / 37.0) * np.cos(y / 53.0)
        pink = np.stack([base + 20, base - 40, base + 5], axis=-1)
        yield np.clip(pink + rng.normal(0, 12, pink.shape), 0, 255).astype(np.uint8)


def _model(base_channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("histo_autoencoder", base_channels=base_channels).eval()


def streamed(slide: str, out: str, base_channels: int) -> float:
    """Child process: `denoise_slide` of level 0; returns seconds."""
    model = _model(base_channels)
    start = time.perf_counter()
    denoise_slide(model, slide, out, level=0, compression="deflate", **OPTIONS)
    return time.perf_counter() - start


def in_memory(slide: str, out: str, base_channels: int) -> float:
    """Child process: level 0 read whole, denoised whole (`denoise_image`), written by the same writer."""
    model = _model(base_channels)
    start = time.perf_counter()
    with open_slide(slide) as source:
        level = source.levels[0]
        image = source.read_rows(0, 0, level.shape[0])
    denoised = denoise_image(model, image, **OPTIONS)
    write_pyramid(out, [denoised], denoised.shape, mpp=level.mpp, magnification=level.magnification)
    return time.perf_counter() - start


def _pixels(path: Path) -> np.ndarray:
    with open_slide(path) as slide:
        return slide.read_rows(0, 0, slide.levels[0].shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["2048x2048", "8192x8192", "2048x8192"],
        help="slide sizes, WIDTHxHEIGHT in pixels",
    )
    parser.add_argument("--base-channels", type=int, default=8, help="histo_autoencoder width (seed: 64)")
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    print(f"model: histo_autoencoder, base_channels={args.base_channels}, random weights; {OPTIONS}\n")
    print("| slide (W x H) | way | peak RSS above baseline (MiB) | time (s) | pixels equal |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=".") as folder:
        for size in args.sizes:
            width, height = (int(n) for n in size.lower().split("x"))
            slide = Path(folder) / f"slide_{size}.tif"
            write_pyramid(slide, tissue_bands(width, height), (height, width, 3), mpp=0.25, magnification=40,
                          compression="jpeg")  # fmt: skip
            outputs = {name: Path(folder) / f"{name}_{size}.tif" for name in ("streamed", "memory")}
            rows = [
                ("streamed", run_measured(streamed, str(slide), str(outputs["streamed"]), args.base_channels)),
                ("in memory", run_measured(in_memory, str(slide), str(outputs["memory"]), args.base_channels)),
            ]
            equal = "yes" if np.array_equal(_pixels(outputs["streamed"]), _pixels(outputs["memory"])) else "NO"
            for way, measured in rows:
                print(f"| {width} x {height} | {way} | {measured.peak_mb:.0f} | {measured.value:.1f} | {equal} |")


if __name__ == "__main__":
    main()
