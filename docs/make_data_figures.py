"""Make docs/phantoms.png and the HU tables of docs/data.md.

Run from the project root:

    .venv/bin/python docs/make_data_figures.py

It draws phantom seed 0 (default 64^3 at 5 mm, no absence) and the real CT
../shared/data/ct/example_ct_sm.nii.gz (labels: its TotalSegmentator segmentation mapped onto the
13 organs), shows both in the same window, and prints per-organ HU statistics and the generation
time as Markdown.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mednets import anatomy
from mednets.data.io import read_volume
from mednets.data.labels import convert_labels
from mednets.data.phantoms import PhantomConfig, generate_phantom
from mednets.data.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"
WINDOW = (-160, 240)  # level 40, width 400 HU


def hu_table(image: np.ndarray, labels: np.ndarray, voxel_ml: float) -> list[str]:
    rows = [
        "| organ | voxels | volume (mL) | mean HU | SD | median | 5th pct | 95th pct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for organ in anatomy.ORGANS:
        values = image[labels == organ.id].astype(float)
        if values.size == 0:
            rows.append(f"| {organ.name} | 0 | - | - | - | - | - | - |")
            continue
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        rows.append(
            f"| {organ.name} | {values.size} | {values.size * voxel_ml:.0f} | {values.mean():.0f} | {values.std():.0f} "
            f"| {p50:.0f} | {p5:.0f} | {p95:.0f} |"
        )
    return rows


def main() -> int:
    timings = []
    for index in range(7):
        start = time.perf_counter()
        generate_phantom(0, PhantomConfig(), case_index=index)
        timings.append(time.perf_counter() - start)
    phantom = generate_phantom(0, PhantomConfig(absence_rates={}))
    p_volume = Volume(phantom.image, phantom.affine).reoriented("LPS")
    p_labels = phantom.labels  # already LPS
    ct = read_volume(SHARED_CT / "example_ct_sm.nii.gz")
    seg = read_volume(SHARED_CT / "example_seg.nii.gz")
    mapped = Volume(convert_labels(seg.array, "totalsegmentator"), seg.affine)
    ct_lps, seg_lps = ct.reoriented("LPS"), mapped.reoriented("LPS")

    def level(labels: np.ndarray, organ: str) -> int:
        return int(np.round(np.argwhere(labels == anatomy.organ_id(organ))[:, 0].mean()))

    figure, axes = plt.subplots(2, 3, figsize=(15, 10.5))
    for row, (name, volume, labels) in enumerate(
        [("phantom (seed 0, 64³ × 5 mm)", p_volume, p_labels), ("real CT example_ct_sm (3 mm)", ct_lps, seg_lps.array)]
    ):
        sz, sy, sx = volume.spacing
        upper = level(labels, "spleen") if row == 0 else min(level(labels, "spleen") + 3, labels.shape[0] - 1)
        kidney = level(labels, "left_kidney")
        coronal = int(np.round(np.argwhere(labels == anatomy.organ_id("aorta"))[:, 1].mean()))
        panels = [
            (f"axial, spleen level (slice {upper})", volume.array[upper], sy / sx, "upper"),
            (f"axial, kidney level (slice {kidney})", volume.array[kidney], sy / sx, "upper"),
            (f"coronal through the aorta (row {coronal})", volume.array[:, coronal, :], sz / sx, "lower"),
        ]
        for axis, (title, image, aspect, origin) in zip(axes[row], panels, strict=True):
            axis.imshow(
                image,
                cmap="gray",
                vmin=WINDOW[0],
                vmax=WINDOW[1],
                aspect=aspect,
                origin=origin,
                interpolation="bilinear",
            )
            axis.set_title(f"{name}\n{title}", fontsize=10)
            axis.set_axis_off()
    figure.suptitle("Same window for both: level 40, width 400 HU. Patient's right on the image left.", fontsize=11)
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "phantoms.png", dpi=80)

    print(
        f"generation time, 64^3 case (7 cases): median {statistics.median(timings):.3f} s, max {max(timings):.3f} s\n"
    )
    print("### Phantom, seed 0, 64^3 at 5 mm\n")
    print("\n".join(hu_table(phantom.image, phantom.labels, 0.125)))
    print("\n### Real CT, example_ct_sm.nii.gz, 3 mm (TotalSegmentator labels mapped to the 13 organs)\n")
    print("\n".join(hu_table(ct.array, mapped.array, ct.voxel_volume_ml())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
