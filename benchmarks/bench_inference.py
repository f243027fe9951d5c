"""3D sliding-window inference: mednets (bf16, channels_last_3d, batched windows) vs MONAI's fp32 default.

For each network: one phantom volume of ``--size``³ voxels (windowed to [0, 1] as in training), the
network's training patch, overlap 0.5, gaussian blending. Rows, timed interleaved (A B A B ...),
median of ``--repeats`` passes after one warm-up:

- MONAI: ``sliding_window_inference(sw_batch_size=1, mode="gaussian")``, fp32, default memory format;
- mednets: ``sliding_window`` in bf16 + channels_last_3d, ``--batch-size`` windows per pass;
- network only: the same number of bf16 window forwards alone, so the blending cost is their difference
  (with freed memory kept for reuse, as `sliding_window` runs them);
- MONAI, memory kept: MONAI's fp32 default again inside `reuse_freed_memory()`, to show how much of
  the speed-up is the allocator setting rather than bf16, channels-last and batching.

The machine's bf16 peak is measured in the same run (a 64->64 channel 3x3x3 conv3d on a
[2, 64, 48, 48, 48] bf16 channels_last_3d input); the network's achieved GFLOP/s (FlopCounterMode
FLOPs of one window forward x windows / network-only time) is shown as a fraction of it. Agreement is
the share of voxels whose argmax equals the fp32 MONAI result.

A second table (`--knobs`, the first `--run`) prices `mednets predict`'s knobs end to end on the same
phantom given the run's voxel spacing (so the whole ``--size``³ grid is windowed): `predict_image`
with the default (overlap 0.5, 2 windows per batch, bf16, no TTA) against one change at a time, timed
interleaved, with the share of voxels labelled as by the default.

Networks come from trained run folders (``--run LABEL=RUN_DIR``, the run's patch size); without one
the registry's network is built with random weights at ``--patch`` (marked "untrained").

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_inference.py \\
        --run "LHA-Net lightweight=runs/lhanet_bench" --run "DynUNet=runs/dynunet_bench"
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
from collections.abc import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from mednets.data.phantoms import PhantomConfig, generate_phantom
from mednets.data.volume import Volume
from mednets.engine.inference import load_run, predict_image
from mednets.engine.sliding_window import sliding_window, window_starts
from mednets.host_memory import reuse_freed_memory
from mednets.models import create_model
from mednets.reports.measure import conv3d_peaks, count_flops, interleaved_medians, machine_description

HU_WINDOW = (-200.0, 300.0)


def _volume(size: int, hu_window: tuple[float, float]) -> torch.Tensor:
    """A phantom at ``size``³ (320 mm field of view), windowed to [0, 1]: ``[1, D, H, W]``."""
    phantom = generate_phantom(0, PhantomConfig(shape=(size, size, size)))
    low, high = hu_window
    return torch.from_numpy(np.clip((phantom.image.astype(np.float32) - low) / (high - low), 0, 1))[None]


def _network(item: str, patch: tuple[int, ...]) -> tuple[str, torch.nn.Module, tuple[int, ...], tuple[float, float]]:
    if "=" in item:
        label, run_dir = item.split("=", 1)
        run = load_run(run_dir)
        window = tuple(run.preprocessing.hu_window or HU_WINDOW)
        return label, run.model, tuple(run.preprocessing.patch_size), window  # type: ignore[return-value]
    torch.manual_seed(0)
    model = create_model(item).eval()  # the registry default: 14 classes
    return f"{item} (untrained)", model, patch, HU_WINDOW


def _row(
    label: str,
    model: torch.nn.Module,
    patch: tuple[int, ...],
    image: torch.Tensor,
    batch_size: int,
    repeats: int,
    peak: float,
) -> str:
    """One table row: MONAI fp32, mednets bf16 + CL and the network alone, timed interleaved."""
    windows = math.prod(len(window_starts(n, p, 0.5)) for n, p in zip(image.shape[1:], patch, strict=True))
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # MONAI's default layout
    fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    batch = torch.rand(batch_size, 1, *patch).contiguous(memory_format=torch.channels_last_3d)
    flops = count_flops(model, torch.rand(1, 1, *patch)) * windows

    def monai() -> torch.Tensor:
        with torch.no_grad():
            return sliding_window_inference(image[None], patch, 1, model, overlap=0.5, mode="gaussian")[0]

    def monai_memory_kept() -> torch.Tensor:
        with reuse_freed_memory():
            return monai()

    def mednets() -> torch.Tensor:
        return sliding_window(fast_model, image, patch, overlap=0.5, batch_size=batch_size)

    def network_only() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), reuse_freed_memory():
            for _ in range(math.ceil(windows / batch_size)):
                fast_model(batch)

    functions = {"monai": monai, "monai kept": monai_memory_kept, "mednets": mednets, "network": network_only}
    times = interleaved_medians(functions, repeats)
    agreement = float((mednets().argmax(0) == monai().argmax(0)).float().mean())
    achieved = flops / times["network"] / 1e9
    return (f"| {label} | {'x'.join(map(str, patch))} | {windows} | {times['monai']:.2f} | {times['mednets']:.2f} "
            f"| {times['monai'] / times['mednets']:.2f}x | {times['monai kept']:.2f} "
            f"| {times['monai kept'] / times['mednets']:.2f}x | {times['network']:.2f} | {achieved:.0f} "
            f"| {achieved / peak:.0%} | {agreement:.4f} |")  # fmt: skip


def knob_table(run_dir: str, size: int, repeats: int) -> str:
    """`predict_image` with its defaults against one knob changed at a time (seconds, ratio, agreement)."""
    run = load_run(run_dir)
    phantom = generate_phantom(0, PhantomConfig(shape=(size, size, size)))
    affine = phantom.affine.copy()
    spacing = np.asarray(run.preprocessing.spacing_mm, dtype=np.float64)[::-1]  # x, y, z = W, H, D
    affine[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * spacing
    volume = Volume(phantom.image.astype(np.int16), affine)
    knobs: dict[str, dict[str, object]] = {
        "default: overlap 0.5, batch 2, bf16, no TTA": {},
        "overlap 0.25": {"overlap": 0.25},
        "overlap 0.75": {"overlap": 0.75},
        "batch 1": {"batch_size": 1},
        "batch 4": {"batch_size": 4},
        "TTA: flips along D, H and W (4 passes)": {"tta": (0, 1, 2)},
        "fp32 (no autocast)": {"precision": "fp32"},
        "scores accumulated in bfloat16": {"accumulate_dtype": "bfloat16"},
    }
    labels: dict[str, np.ndarray] = {}

    def predictor(name: str, options: dict[str, object]) -> Callable[[], None]:
        def predict() -> None:
            labels[name] = predict_image(run, volume, **options).labels  # type: ignore[arg-type]

        return predict

    times = interleaved_medians({name: predictor(name, options) for name, options in knobs.items()}, repeats)
    default = next(iter(knobs))
    lines = [f"`mednets predict` knobs, {run_dir} on a {size}³ phantom at the run's spacing; median of {repeats}\n",
             "| knob | seconds | time vs default | voxels labelled as by the default |", "|---|---|---|---|"]  # fmt: skip
    for name in knobs:
        agreement = float((labels[name] == labels[default]).mean())
        lines.append(f"| {name} | {times[name]:.2f} | {times[name] / times[default]:.2f}x | {agreement:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR of a trained 3D patch model")
    parser.add_argument("--model", action="append", default=[], help="registry name, random weights")
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=2)  # mednets predict's default (fastest here)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--knobs", action="store_true", help="also price predict's knobs on the first --run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    items = args.run + args.model or ["lhanet_lightweight", "dynunet"]
    peak = conv3d_peaks(args.repeats)["bf16 + CL"]
    print(f"# Sliding-window inference over 1x1x{args.size}³, overlap 0.5, gaussian, {datetime.date.today()}\n")
    print(machine_description() + "\n")
    print("`" + " ".join([".venv/bin/python", *sys.argv]) + "`; median of", args.repeats, "interleaved passes\n")
    print(f"bf16 conv3d peak measured in this run: {peak:.0f} GFLOP/s\n")
    print("| network | patch | windows | MONAI fp32 (s) | mednets bf16+CL (s) | speed-up | MONAI fp32, memory kept (s) "
          "| speed-up over it | network only (s) | network GFLOP/s | share of bf16 peak | argmax agreement |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for item in items:
        label, model, patch, window = _network(item, tuple(args.patch))
        print(_row(label, model, patch, _volume(args.size, window), args.batch_size, args.repeats, peak), flush=True)
    if args.knobs and args.run:
        print("\n" + knob_table(args.run[0].split("=", 1)[1], args.size, max(3, args.repeats // 2)))


if __name__ == "__main__":
    main()
