"""What keeping freed host memory (`mednets.host_memory.reuse_freed_memory`) buys, and costs.

Each row is measured twice, with glibc's default allocator and with freed memory kept for reuse, in
fresh child processes alternated A B A B (`mednets.reports.measure.run_measured`: peak resident
memory above the child's baseline). A child builds the model, runs one warm-up and `--repeats` timed
passes and returns their median time. Rows:

- the bf16 + channels_last_3d forward of a registered 3D model at [2, 1, 64, 64, 64] (random weights);
- `sliding_window` over a 160³ phantom with a trained run (``--run LABEL=RUN_DIR``), as
  `bench_inference.py` runs it (overlap 0.5, 2 windows per pass, bf16 + channels_last_3d).

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_host_memory.py \\
        --run "LHA-Net lightweight=runs/lhanet_bench" --run "DynUNet=runs/dynunet_bench"
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mednets.host_memory import reuse_freed_memory
from mednets.reports.measure import machine_description, median_time, run_measured

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import _network, _volume  # the same networks and phantom


def _timed(run: Callable[[], object], keep: bool, repeats: int) -> float:
    """Median seconds of `run()` over `repeats` calls after one warm-up, the setting on or off throughout."""
    with reuse_freed_memory() if keep else contextlib.nullcontext():
        return median_time(run, repeats=repeats, warmup=1)


def forward_pass(model_name: str, keep: bool, repeats: int) -> float:
    """Child process: the bf16 + channels_last_3d forward of `model_name` at [2, 1, 64, 64, 64]."""
    _, model, _, _ = _network(model_name, (64, 64, 64))
    model = model.to(memory_format=torch.channels_last_3d)
    x = torch.rand(2, 1, 64, 64, 64).contiguous(memory_format=torch.channels_last_3d)

    def run() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)

    return _timed(run, keep, repeats)


def sliding_window(item: str, keep: bool, repeats: int) -> float:
    """Child process: `sliding_window` over a 160³ phantom with the run `item` (LABEL=RUN_DIR)."""
    from mednets import host_memory
    from mednets.engine.sliding_window import sliding_window

    _, model, patch, window = _network(item, (64, 64, 64))
    model = model.to(memory_format=torch.channels_last_3d)
    image = _volume(160, window)
    if not keep:  # sliding_window turns the setting on itself: off means no glibc handle at all
        host_memory._LIBC = None
    return _timed(lambda: sliding_window(model, image, patch, overlap=0.5, batch_size=2), keep, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None, help="registry name for a forward row")
    parser.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR for a sliding-window row")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per child")
    parser.add_argument("--children", type=int, default=2, help="child processes per setting (alternated)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [
        (f"{name} bf16 forward, [2, 1, 64³]", forward_pass, name)
        for name in args.model or ["dynunet", "lhanet_lightweight"]
    ]
    rows += [(f"sliding window over 160³, {item.split('=', 1)[0]}", sliding_window, item) for item in args.run]
    print(f"# Freed host memory kept vs glibc's default, {time.strftime('%Y-%m-%d')}\n")
    print(machine_description() + "\n")
    print("`" + " ".join([".venv/bin/python", *sys.argv]) + f"`; medians over {args.children} children per setting\n")
    print("| pass | default (s) | memory kept (s) | speed-up | default peak MB | memory kept peak MB |")
    print("|---|---|---|---|---|---|")
    for label, fn, item in rows:
        results: dict[bool, list] = {False: [], True: []}
        for _ in range(args.children):
            for keep in (False, True):
                results[keep].append(run_measured(fn, item, keep, args.repeats))
        seconds = {keep: statistics.median(m.value for m in ms) for keep, ms in results.items()}
        peak = {keep: statistics.median(m.peak_mb for m in ms) for keep, ms in results.items()}
        print(f"| {label} | {seconds[False]:.3f} | {seconds[True]:.3f} | {seconds[False] / seconds[True]:.2f}x "
              f"| {peak[False]:.0f} | {peak[True]:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
