"""2D UNet segmentation scored on a held-out 2D dataset folder, with overlay figures.

Predicts every test image the way `mednets predict` does (`predict_image_2d`: tiles of the training
patch size, bf16), prints foreground Dice per case and their mean (and per structure for multi-class
runs), and optionally writes image / truth / prediction overlays.

Run (under the heavy-job lock):

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_unet2d.py --run runs/unet2d_nuclei \
        --test runs/nuclei2d/test --figure docs/unet2d_nuclei.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mednets.data.dataset import load_dataset
from mednets.data.fingerprint import read_case_arrays
from mednets.data.intensity import normalise
from mednets.data.io import read_any
from mednets.engine.inference import load_run, predict_image
from mednets.metrics import score_structures
from mednets.reports.sample_figures import segmentation_overlays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True, help="2D dataset folder with the test images and labels")
    parser.add_argument("--figure", type=Path)
    parser.add_argument("--figure-cases", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = load_run(args.run)
    dataset = load_dataset(args.test)
    per_structure: dict[str, list[float]] = {name: [] for name in run.structures}
    case_dice, samples, seconds = [], [], 0.0
    for case in dataset.training:
        start = time.perf_counter()
        prediction = predict_image(run, read_any(case.images[0])).labels
        seconds += time.perf_counter() - start
        channels, labels, _ = read_case_arrays(case)
        image = np.stack([normalise(c, rule) for c, rule in zip(channels, run.preprocessing.rules(), strict=True)])
        truth = np.asarray(labels).astype(np.int64)
        scores = score_structures(prediction, truth, run.structures, (1.0, 1.0))
        dices = [s.dice for s in scores.values() if s.dice is not None]
        for name, score in scores.items():
            if score.dice is not None:
                per_structure[name].append(score.dice)
        case_dice.append(float(np.mean(dices)) if dices else float("nan"))
        samples.append({"name": case.case_id, "image": image[0] if image.shape[0] == 1 else image, "truth": truth,
                        "prediction": prediction})  # fmt: skip
    print(f"{len(case_dice)} test images from {args.test}; {seconds / len(case_dice):.2f} s per image")
    print("| case | Dice (mean over structures present in the truth) |\n|---|---|")
    for sample, dice in zip(samples, case_dice, strict=True):
        print(f"| {sample['name']} | {dice:.3f} |")
    print(f"| **mean** | **{np.nanmean(case_dice):.3f}** |")
    if len(per_structure) > 1:
        print("\n| structure | Dice | cases |\n|---|---|---|")
        for name, values in per_structure.items():
            print(f"| {name} | {np.mean(values) if values else float('nan'):.3f} | {len(values)} |")
    if args.figure:
        picks = np.linspace(0, len(samples) - 1, min(args.figure_cases, len(samples))).round().astype(int)
        print("wrote", segmentation_overlays([samples[i] for i in picks], args.figure))


if __name__ == "__main__":
    main()
