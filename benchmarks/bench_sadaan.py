"""SADAAn at the seed's size: what the efficient segmentation head and bf16 + channels_last_3d buy.

Rows, at `[2, 1, 64, 64, 64]` with 5 structures (the seed configuration, 8,019,230 parameters):

1. seed-style replicated head, fp32 (features replicated once per structure: `[B*S, 64, D, H, W]`)
2. efficient head, fp32 (one 1x1x1 convolution, then the per-voxel attention scale)
3. efficient head, bf16 autocast + `channels_last_3d`

Forward = eval mode, no gradients. Training step = forward, `SpatialAttentionLoss` (mixed presence),
backward, Adam step. Times are medians after a warm-up; peak memory is the peak resident set size
of a fresh child process above its baseline while it builds the model and runs every repetition
(`mednets.reports.measure.run_measured`), so it counts weights, gradients, Adam state and
activations. Ratios are to row 1 (higher is better). Row 1 is the seed's way, run as the seed runs
(glibc's default allocator); mednets' rows keep freed host memory for reuse, as `mednets train` does
(`train.keep_freed_memory`, on by default), and extra rows give row 1 the same setting and take
it from row 3. A second table adds the model's gradient-checkpointing
switch to row 3 (not one of the issue's rows); a third times the `sadaan_fast` preset.

Run: `flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_sadaan.py` (about 10 minutes on
2 cores; the timings are noisy when other work shares the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from dataclasses import dataclass

import torch

from mednets.host_memory import reuse_freed_memory
from mednets.losses import SpatialAttentionLoss
from mednets.models import create_model
from mednets.reports.measure import median_time, run_measured


@dataclass(frozen=True)
class Setting:
    """One row: a registered model, its head formulation and its precision."""

    label: str
    model: str
    replicated_head: bool
    bf16: bool
    checkpointing: bool = False
    keep_memory: bool = True  # freed host memory kept for reuse, as `mednets train` runs (`reuse_freed_memory`)


SEED_ROWS = (
    Setting("seed-style replicated head, fp32", "sadaan", True, False, keep_memory=False),
    Setting("efficient head, fp32", "sadaan", False, False),
    Setting("efficient head, bf16 + channels_last_3d", "sadaan", False, True),
)
# Not among the three rows, shown separately with ratios to row 1: the model's
# gradient-checkpointing switch on top of row 3 (its recompute cost and the memory it saves), row 1
# with freed memory kept (how much of the speed-up is the allocator setting alone), and row 3 with
# it off (`train.keep_freed_memory: false`: the memory it costs).
EXTRA_ROWS = (
    Setting("row 3 + gradient checkpointing", "sadaan", False, True, checkpointing=True),
    Setting("row 1 with freed memory kept for reuse", "sadaan", True, False),
    Setting("row 3 with freed memory returned (keep_freed_memory: false)", "sadaan", False, True, keep_memory=False),
)
FAST_ROWS = (Setting("sadaan_fast (13 structures), bf16 + channels_last_3d", "sadaan_fast", False, True),)


def _targets(batch: int, structures: int, grid: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Box masks with mixed presence: structure s is absent in sample b when (b + s) % 3 == 0."""
    masks = torch.zeros(batch, structures, *grid)
    d, h, w = grid
    for b in range(batch):
        for s in range(structures):
            if (b + s) % 3:
                z, y = (s * d // structures) % (d // 2), (s * 7) % (h // 2)
                masks[b, s, z : z + d // 4, y : y + h // 4, w // 4 : w // 2] = 1
    return {"segmentation_targets": masks}


def _measure(setting: Setting, mode: str, batch: int, warmup: int, repeats: int) -> float:
    """Build the model, run `warmup + repeats` forwards or training steps; return the median time (child process)."""
    torch.manual_seed(0)
    model = create_model(setting.model, replicated_head=setting.replicated_head)
    model.set_gradient_checkpointing(setting.checkpointing)
    x = torch.randn(batch, 1, *model.grid_size)
    if setting.bf16:
        model.to_channels_last()
        x = x.contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=setting.bf16)

    if mode == "forward":
        model.eval()

        def run() -> None:
            with torch.no_grad(), autocast:
                model(x)

    else:
        model.train()
        loss_fn = SpatialAttentionLoss()
        targets = _targets(batch, model.num_structures, model.grid_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def run() -> None:
            with autocast:
                outputs = model(x)
            loss_fn(outputs, targets)["total"].backward()  # the loss computes in fp32 outside autocast
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with reuse_freed_memory() if setting.keep_memory else contextlib.nullcontext():
        return median_time(run, repeats=repeats, warmup=warmup)


def _row(setting: Setting, args: argparse.Namespace) -> dict[str, float]:
    forward = run_measured(_measure, setting, "forward", args.batch, 1, args.repeats)
    train = run_measured(_measure, setting, "train", args.batch, 1, args.train_repeats)
    return {"fwd_s": forward.value, "fwd_mb": forward.peak_mb, "step_s": train.value, "step_mb": train.peak_mb}


def _print_table(rows: list[tuple[Setting, dict[str, float]]], reference: dict[str, float] | None = None) -> None:
    """Markdown table; with a `reference` row's figures, ratios to it (speed-up and memory saving)."""
    header = f"| {'setting':<60} | forward s | forward peak MB | train step s | train step peak MB |"
    if reference is not None:
        header += " step speed-up | step memory saving | forward speed-up | forward memory saving |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    first = reference
    for setting, r in rows:
        line = f"| {setting.label:<60} | {r['fwd_s']:9.2f} | {r['fwd_mb']:15.0f} | {r['step_s']:12.2f} | {r['step_mb']:18.0f} |"
        if first is not None:
            line += (
                f" {first['step_s'] / r['step_s']:12.2f}x | {first['step_mb'] / r['step_mb']:17.2f}x |"
                f" {first['fwd_s'] / r['fwd_s']:15.2f}x | {first['fwd_mb'] / r['fwd_mb']:20.2f}x |"
            )
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per row (after one warm-up)")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps per row (after one warm-up)")
    parser.add_argument("--skip-extra", action="store_true", help="skip the gradient-checkpointing row")
    parser.add_argument("--skip-fast", action="store_true", help="skip the sadaan_fast table")
    args = parser.parse_args()

    print(
        f"# SADAAn benchmark: batch {args.batch}, 64³ grid; torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("Seed configuration (5 structures, 8,019,230 parameters); ratios to the first row:\n")
    seed_rows = [(s, _row(s, args)) for s in SEED_ROWS]
    _print_table(seed_rows, reference=seed_rows[0][1])
    if not args.skip_extra:
        print("\nBeyond the issue's rows (ratios to the first row above):\n")
        _print_table([(s, _row(s, args)) for s in EXTRA_ROWS], reference=seed_rows[0][1])
    if not args.skip_fast:
        print("\nCPU preset:\n")
        _print_table([(s, _row(s, args)) for s in FAST_ROWS])


if __name__ == "__main__":
    main()
