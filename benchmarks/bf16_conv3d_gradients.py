"""Where torch's CPU bf16 Conv3d weight gradient goes wrong: a grid of small input sizes, each in its own process.

For each convolution (kernel, stride), input size [D, H, W], batch and memory format, compares the
weight gradient under CPU bf16 autocast with the fp32 one (relative L2 error), for `nn.Conv3d` and
for `mednets.models.kernels.BF16SafeConv3d`. Each call runs in a fresh process: a bad call can
corrupt the heap and crash later ones ("double free or corruption").

    .venv/bin/python benchmarks/bf16_conv3d_gradients.py [--sides 1 2 3 4] [--batches 2] [--contiguous]

Prints the wrong cases (error above 5%, inf, NaN or a crash) and a summary table per layer.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from collections import Counter

ONE_CALL = """
import sys, torch
from mednets.models.kernels import BF16SafeConv3d
layer, kernel, stride, d, h, w, batch, channels_last = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
kind = BF16SafeConv3d if layer == "safe" else torch.nn.Conv3d
conv = kind(16, 16, kernel, stride=stride, padding=kernel // 2)
x = torch.randn(batch, 16, d, h, w)
if channels_last:
    conv, x = conv.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
grads = []
for bf16 in (False, True):
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
        out = conv(x)
    out.float().square().mean().backward()
    grads.append(conv.weight.grad.clone())
print(((grads[1] - grads[0]).norm() / grads[0].norm()).item())
"""


def relative_error(layer: str, kernel: int, stride: int, size: tuple[int, int, int], batch: int, cl: bool) -> float:
    """The bf16 weight gradient's relative error in a fresh process; inf for a crash."""
    argv = [sys.executable, "-c", ONE_CALL, layer, str(kernel), str(stride), *map(str, size), str(batch), str(int(cl))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[2])
    parser.add_argument(
        "--contiguous", action="store_true", help="also the contiguous layout (training's is channels_last)"
    )
    args = parser.parse_args()
    convolutions = [(3, 1), (3, 2)]
    wrong: Counter[tuple[str, int, int]] = Counter()
    tried: Counter[tuple[str, int, int]] = Counter()
    wrong_with_every_side_4: Counter[str] = Counter()
    print("| layer | kernel | stride | D, H, W | batch | channels_last | relative error |")
    print("|---|---|---|---|---|---|---|")
    for layer, (kernel, stride), size, batch, cl in itertools.product(
        ("plain", "safe"),
        convolutions,
        itertools.product(args.sides, repeat=3),
        args.batches,
        (True, False) if args.contiguous else (True,),
    ):
        error = relative_error(layer, kernel, stride, size, batch, cl)
        key = (layer, kernel, stride)
        tried[key] += 1
        if not error <= 0.05:
            wrong[key] += 1
            wrong_with_every_side_4[layer] += min(size) >= 4
            print(f"| {layer} | {kernel} | {stride} | {size} | {batch} | {cl} | {error:.3g} |", flush=True)
    print("\n| layer | kernel | stride | calls | wrong (error > 5%, inf, NaN, crash) |")
    print("|---|---|---|---|---|")
    for key in sorted(tried):
        print(f"| {key[0]} | {key[1]} | {key[2]} | {tried[key]} | {wrong[key]} |")
    for layer in ("plain", "safe"):
        print(f"{layer}: {wrong_with_every_side_4[layer]} wrong calls with every side >= 4")


if __name__ == "__main__":
    main()
