"""Histology denoising on held-out real H&E tiles: trained autoencoders against non-local means.

Test set: every 256x256 tile of `../shared/data/histology` (non-overlapping grid) that holds at least
25% tissue (`mednets.data.histology.tissue_tiles`): the near-white and background tiles drop out.
These images are never used for training (the runs train on scikit-image's IHC image). Each tile gets
its noise once, seeded by its index, so every method sees the same noisy tiles.

Baseline: scikit-image's non-local means, sigma from `estimate_sigma`, with `patch_size`,
`patch_distance` and `h / sigma` tuned for mean PSNR on noisy tiles of the training image
(`--tune-nlm` writes them to a JSON file; evaluation reads it).

Rows: the noisy input, NLM, and each run (`mednets denoise`'s path: `denoise_array`, bf16; with
`--keep-mean-colour` a second row per run gives each tile the noisy tile's mean colour). PSNR and
SSIM (`mednets.metrics`) are means over tiles; "gain" is the mean PSNR gain over the noisy input;
"beats NLM" counts tiles where the method has both higher PSNR and higher SSIM than NLM. For a noise
mixture a second table gives each method's mean gain per combination of noises the tiles drew;
`--ceiling` scores each run on the clean tiles too (how closely it can reproduce a tile at all).

Run (each step under the heavy-job lock):

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_histo_denoise.py --noise gaussian \
        --tune-nlm runs/nlm_gaussian.json
    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_histo_denoise.py --noise gaussian \
        --nlm runs/nlm_gaussian.json --run HistoAutoencoder=runs/histo_gauss --figure docs/histo_gaussian.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from skimage.restoration import denoise_nl_means, estimate_sigma

from mednets.data.histology import NoiseMixture, NoisyTiles, default_training_image, read_rgb
from mednets.data.io import list_image_files
from mednets.engine.denoise import denoise_array, load_denoiser
from mednets.metrics import psnr, ssim
from mednets.reports.sample_figures import denoising_triplets

NOISES = {"gaussian": [{"model": "gaussian", "sigma": 0.1}], "seed": "seed"}
HELD_OUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "histology"
NLM_GRID = {"patch_size": (3, 5, 7), "patch_distance": (2, 3, 4, 6, 9), "h_factor": (0.3, 0.4, 0.5, 0.6, 0.8, 1.0)}


def nlm(noisy: np.ndarray, patch_size: int, patch_distance: int, h_factor: float) -> np.ndarray:
    """Non-local means of an RGB tile ``[3, H, W]``; sigma estimated from the tile."""
    pixels = noisy.transpose(1, 2, 0)
    sigma = float(estimate_sigma(pixels, channel_axis=-1, average_sigmas=True))
    out = denoise_nl_means(pixels, h=h_factor * sigma, sigma=sigma, patch_size=patch_size,
                           patch_distance=patch_distance, channel_axis=-1, fast_mode=True)  # fmt: skip
    return np.clip(out, 0, 1).transpose(2, 0, 1).astype(np.float32)


def scores(output: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    a, b = torch.as_tensor(output)[None].float(), torch.as_tensor(clean)[None].float()
    return float(psnr(a, b)[0]), float(ssim(a, b)[0])


def tune_nlm(noise: object, out: Path) -> dict:
    """Grid-search NLM settings for mean PSNR on 8 noisy 128-pixel tiles of the training image's training rows."""
    image = default_training_image()[:, :384]
    tiles = NoisyTiles([image], 128, NoiseMixture(noise), max_tiles=8, seed=100)
    results = []
    for patch_size, patch_distance, h_factor in itertools.product(*NLM_GRID.values()):
        values = [scores(nlm(t["image"].numpy(), patch_size, patch_distance, h_factor), t["target"].numpy())
                  for t in tiles]  # fmt: skip
        results.append({"patch_size": patch_size, "patch_distance": patch_distance, "h_factor": h_factor,
                        "psnr": float(np.mean([v[0] for v in values])),
                        "ssim": float(np.mean([v[1] for v in values]))})  # fmt: skip
        print(results[-1], flush=True)
    best = max(results, key=lambda r: r["psnr"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"best": best, "grid": results}, indent=2))
    return best


def print_by_noise(rows: dict[str, list[tuple[float, float]]], noises: list[str]) -> None:
    """Mean PSNR gain over the noisy input per noise combination the tiles drew (mixtures only)."""
    kinds = sorted(set(noises), key=lambda kind: (kind.count("+"), kind))
    if len(kinds) < 2:
        return
    methods = [name for name in rows if name != "noisy input"]
    noisy = np.array([psnr for psnr, _ in rows["noisy input"]])
    print("\nBy the noise each tile drew: noisy PSNR and each method's mean PSNR gain over it (dB)\n")
    print("| noise | tiles | noisy PSNR dB | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for kind in kinds:
        where = np.array([noise == kind for noise in noises])
        gains = [np.mean(np.array([psnr for psnr, _ in rows[name]])[where] - noisy[where]) for name in methods]
        print(
            f"| {kind} | {where.sum()} | {noisy[where].mean():.2f} | " + " | ".join(f"{g:+.2f}" for g in gains) + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", choices=list(NOISES), required=True)
    parser.add_argument("--tune-nlm", type=Path, help="tune NLM on training tiles and write the settings here")
    parser.add_argument("--nlm", type=Path, help="tuned NLM settings (JSON from --tune-nlm)")
    parser.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR of a denoising run (repeatable)")
    parser.add_argument("--figure", type=Path, help="write noisy / outputs / clean triplets of 4 tiles here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="of the autoencoders")
    parser.add_argument("--keep-mean-colour", action="store_true",
                        help="also score each run with `denoise_array(keep_mean_colour=True)` (a second row)")  # fmt: skip
    parser.add_argument("--ceiling", action="store_true", help="also score each run on the clean tiles")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.tune_nlm:
        print("best", tune_nlm(NOISES[args.noise], args.tune_nlm))
        return
    files = list_image_files(HELD_OUT)
    tiles = NoisyTiles([read_rgb(p) for p in files], 256, NoiseMixture(NOISES[args.noise]), seed=args.seed,
                       names=[p.stem for p in files])  # fmt: skip
    methods: dict[str, object] = {}
    if args.nlm:
        best = json.loads(args.nlm.read_text())["best"]
        settings = {k: best[k] for k in ("patch_size", "patch_distance", "h_factor")}
        methods["NLM (tuned)"] = lambda noisy: nlm(noisy, **settings)
        print("NLM settings:", settings)
    for item in args.run:
        label, run_dir = item.split("=", 1)
        model = load_denoiser(run_dir)
        for keep in (False, True) if args.keep_mean_colour else (False,):
            methods[f"{label}, mean colour kept" if keep else label] = lambda noisy, model=model, keep=keep: (
                denoise_array(model, torch.from_numpy(noisy), precision=args.precision, keep_mean_colour=keep).numpy()
            )
    rows = {"noisy input": [], **{name: [] for name in methods}}
    seconds = {name: 0.0 for name in methods}
    outputs = []
    for tile in tiles:
        noisy, clean = tile["image"].numpy(), tile["target"].numpy()
        rows["noisy input"].append(scores(noisy, clean))
        outputs.append({"name": f"{tile['name']} ({tile['noise']})", "noisy": noisy, "clean": clean, "outputs": {}})
        for name, method in methods.items():
            start = time.perf_counter()
            out = method(noisy)
            seconds[name] += time.perf_counter() - start
            rows[name].append(scores(out, clean))
            outputs[-1]["outputs"][name] = out
    noisy_psnr = np.array([v[0] for v in rows["noisy input"]])
    nlm_name = next((n for n in methods if n.startswith("NLM")), None)
    print(f"\n{len(tiles)} held-out tissue tiles of 256x256 from {HELD_OUT}, noise {args.noise}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n")  # fmt: skip
    print("| method | PSNR dB | SSIM | gain over noisy dB | tiles beating NLM (PSNR and SSIM) | s per tile |")
    print("|---|---|---|---|---|---|")
    for name, values in rows.items():
        values_array = np.array(values)
        gain = values_array[:, 0] - noisy_psnr
        beats = "-"
        if nlm_name and name not in ("noisy input", nlm_name):
            reference = np.array(rows[nlm_name])
            beats = f"{int(((values_array[:, 0] > reference[:, 0]) & (values_array[:, 1] > reference[:, 1])).sum())}/{len(values)}"
        timing = f"{seconds[name] / len(tiles):.2f}" if name in seconds else "-"
        print(f"| {name} | {values_array[:, 0].mean():.2f} | {values_array[:, 1].mean():.3f} | {gain.mean():+.2f} | "
              f"{beats} | {timing} |")  # fmt: skip
    print_by_noise(rows, [tile["noise"] for tile in tiles])
    if args.ceiling:
        print("\nEach run given the clean tiles (no noise): how closely it can reproduce a tile at all\n")
        print("| method | PSNR dB | SSIM |")
        print("|---|---|---|")
        for name, method in methods.items():
            if not name.startswith("NLM"):
                clean_scores = np.array(
                    [scores(method(tile["target"].numpy()), tile["target"].numpy()) for tile in tiles]
                )
                print(f"| {name} | {clean_scores[:, 0].mean():.2f} | {clean_scores[:, 1].mean():.3f} |")
    if args.figure:
        picks = np.linspace(0, len(outputs) - 1, 4).round().astype(int)
        print("\nwrote", denoising_triplets([outputs[i] for i in picks], args.figure))


if __name__ == "__main__":
    main()
