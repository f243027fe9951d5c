"""Peak training memory and step time of UNet with and without gradient checkpointing, side by side.

Usage: .venv/bin/python benchmarks/bench_checkpointing.py [--batch 2] [--size 512] [--repeats 3]

Each configuration runs in a fresh child process (`mednets.reports.measure.run_measured`): peak
resident memory above the child's baseline while it builds UNet (seed configuration, 31M
parameters), creates Adam, and runs warm-up plus timed training steps.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from mednets.models import create_model
from mednets.reports.measure import machine_description, median_time, run_measured


def train_steps(checkpointing: bool, batch: int, size: int, repeats: int) -> float:
    """Median seconds per Adam step of UNet on random data (runs in the measuring child)."""
    torch.manual_seed(0)
    model = create_model("unet", in_channels=3, out_channels=1).set_gradient_checkpointing(checkpointing).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size)
    masks = (torch.rand(batch, 1, size, size) > 0.5).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), masks).backward()
        optimizer.step()

    return median_time(step, repeats=repeats, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows = []
    for checkpointing in (False, True):
        measured = run_measured(train_steps, checkpointing, args.batch, args.size, args.repeats)
        rows.append(("on" if checkpointing else "off", measured.peak_mb, measured.value))

    base_memory, base_time = rows[0][1], rows[0][2]
    print(f"# UNet training step, input [{args.batch}, 3, {args.size}, {args.size}], fp32, Adam")
    print(f"# {datetime.date.today()}, {machine_description()}")
    print("| checkpointing | peak memory (MB) | memory vs off | step time (s) | time vs off |")
    print("|---|---|---|---|---|")
    for label, memory, seconds in rows:
        print(f"| {label} | {memory:,.0f} | {memory / base_memory:.2f}x | {seconds:.2f} | {seconds / base_time:.2f}x |")
    saving = 1 - rows[1][1] / base_memory
    print(f"\nmemory saved by checkpointing: {saving:.1%} (target: at least 30%)")


if __name__ == "__main__":
    main()
