"""Figures of 2D samples: noisy / denoised / clean triplets with PSNR and SSIM, and segmentation overlays.

Both functions take plain arrays and write one PNG. Images are ``[3, H, W]`` RGB or ``[H, W]`` grey
in [0, 1]; label maps are ``[H, W]`` integer ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")  # reports are written headless

import matplotlib.pyplot as plt

from mednets.atomic import atomic_path
from mednets.metrics import dice_per_class, psnr, ssim

__all__ = ["denoising_triplets", "segmentation_overlays"]


def _show(axis: Any, image: np.ndarray, title: str) -> None:
    image = np.asarray(image)
    axis.imshow(image.transpose(1, 2, 0) if image.ndim == 3 else image, cmap="gray", vmin=0, vmax=1)
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def _save(figure: Any, out: str | os.PathLike[str]) -> Path:
    """Write `figure` in the format of `out`'s suffix (PNG, JPEG, ...), atomically."""
    with atomic_path(out) as temporary:  # the temporary name keeps the suffix, which picks the format
        figure.savefig(temporary, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(out)


def _quality(image: np.ndarray, clean: np.ndarray) -> str:
    a, b = torch.as_tensor(image)[None].float(), torch.as_tensor(clean)[None].float()
    return f"PSNR {float(psnr(a, b)[0]):.2f} dB, SSIM {float(ssim(a, b)[0]):.3f}"


def denoising_triplets(samples: Sequence[Mapping[str, Any]], out: str | os.PathLike[str]) -> Path:
    """One row per sample: noisy, each method's output, clean; titles give PSNR and SSIM against the clean image.

    Args:
        samples: ``{"name": str, "noisy": [3, H, W], "clean": [3, H, W], "outputs": {method: [3, H, W]}}``.
        out: PNG path.
    """
    methods = list(samples[0]["outputs"])
    figure, axes = plt.subplots(len(samples), len(methods) + 2, figsize=(2.6 * (len(methods) + 2), 2.8 * len(samples)),
                                squeeze=False)  # fmt: skip
    for row, sample in zip(axes, samples, strict=True):
        _show(row[0], sample["noisy"], f"{sample['name']}\nnoisy: {_quality(sample['noisy'], sample['clean'])}")
        for axis, method in zip(row[1:], methods, strict=False):
            _show(axis, sample["outputs"][method], f"{method}\n{_quality(sample['outputs'][method], sample['clean'])}")
        _show(row[-1], sample["clean"], "clean")
    figure.tight_layout()
    return _save(figure, out)


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice (`mednets.metrics.dice_per_class` of the masks); 1 when both are empty."""
    masks = torch.stack([torch.as_tensor(np.asarray(m) > 0) for m in (prediction, truth)]).long()
    dice = float(dice_per_class(masks[:1], masks[1:], 2)[0, 0])
    return 1.0 if np.isnan(dice) and not (np.asarray(prediction) > 0).any() else (0.0 if np.isnan(dice) else dice)


def segmentation_overlays(samples: Sequence[Mapping[str, Any]], out: str | os.PathLike[str]) -> Path:
    """One row per sample: the image, the truth and the prediction overlaid (foreground Dice in the title).

    Args:
        samples: ``{"name": str, "image": [H, W] or [3, H, W] in [0, 1], "truth": [H, W], "prediction": [H, W]}``.
        out: PNG path.
    """
    figure, axes = plt.subplots(len(samples), 3, figsize=(9, 3.2 * len(samples)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for row, sample in zip(axes, samples, strict=True):
        image = np.asarray(sample["image"])
        _show(row[0], image, sample["name"])
        for axis, key in zip(row[1:], ("truth", "prediction"), strict=True):
            labels = np.asarray(sample[key])
            _show(axis, image, key if key == "truth" else f"prediction: Dice {_dice(labels, sample['truth']):.3f}")
            rgba = colours(labels % 20)
            rgba[..., 3] = np.where(labels > 0, 0.45, 0.0)
            axis.imshow(rgba)
    figure.tight_layout()
    return _save(figure, out)
