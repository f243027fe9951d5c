"""LHA-Net: parameters per component, forward and training-step time, peak memory; fp32 vs bf16 + channels_last_3d.

Usage: .venv/bin/python benchmarks/bench_lhanet.py [--repeats 2] [--models NAME ...] [--params-only]

Every measurement runs in a fresh child process (`mednets.reports.measure.run_measured`): the peak
is the resident memory above the child's baseline while it builds the model and runs warm-up plus
timed passes (weights, activations and, for training, gradients and AdamW state included); the
time is the median of the timed passes. Training steps use `DeepSupervisionLoss` on random labels.
Also checks the issue's limits: inference at [1, 1, 64, 128, 128] peaks at most 1.5 GB,
[1, 1, 96, 192, 192] runs, and a checkpointed training step at [1, 1, 64, 128, 128] stays under 6 GB.
The seed's figures are GPU memory on an RTX 3060 (its report), shown for comparison only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime

import torch

from mednets.losses import DeepSupervisionLoss
from mednets.models import create_model
from mednets.reports.measure import machine_description, median_time, run_measured

SIZE = (64, 128, 128)
LARGE = (96, 192, 192)
NUM_CLASSES = 14
# Seed 003's report: stated total and PMSA parameters (its components do not add up to its totals),
# and peak GPU memory (MB) at 64x128x128 inference.
SEED = {
    "lhanet_lightweight": {"total": 311_237_575, "pmsa": 279_965_964, "peak": 2278},
    "lhanet_standard": {"total": 330_290_375, "pmsa": 279_965_964, "peak": 1851},
}
INFERENCE_LIMIT_MB = 1500
TRAINING_LIMIT_MB = 6000


def _prepare(name: str, size: tuple[int, ...], fast: bool, train: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name).train(train)
    x = torch.randn(1, 1, *size)
    if fast:
        model.to_channels_last()
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return model, x


def _precision(fast: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if fast else contextlib.nullcontext()


def inference(name: str, size: tuple[int, ...], fast: bool, repeats: int) -> float:
    """Median seconds of one no-grad forward pass (runs in the measuring child)."""
    model, x = _prepare(name, size, fast, train=False)

    def forward() -> None:
        with torch.no_grad(), _precision(fast):
            model(x)

    return median_time(forward, repeats=repeats, warmup=1)


def training(name: str, size: tuple[int, ...], fast: bool, checkpointing: bool, repeats: int) -> float:
    """Median seconds of one AdamW step with deep supervision (runs in the measuring child)."""
    model, x = _prepare(name, size, fast, train=True)
    model.set_gradient_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, NUM_CLASSES, (1, 1, *size))
    loss_fn = DeepSupervisionLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _precision(fast):
            outputs = model(x)
        loss_fn(outputs, labels)["total"].backward()
        optimizer.step()

    return median_time(step, repeats=repeats, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["lhanet_lightweight", "lhanet_standard"])
    parser.add_argument("--params-only", action="store_true", help="print the parameter table and stop")
    args = parser.parse_args()
    r = args.repeats
    size_text = "x".join(map(str, SIZE))

    print(f"# LHA-Net, batch 1, {datetime.date.today()}, {machine_description()}")
    print("\n## Parameters per component (seed 003's figures beside ours)\n")
    print("| model | backbone | PMSA | decoder + heads | total | seed total | seed PMSA |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        b = create_model(name).parameter_breakdown()
        seed = SEED[name]
        print(
            f"| {name} | {b['backbone']:,} | {b['pmsa']:,} | {b['decoder']:,} | {sum(b.values()):,} "
            f"| {seed['total']:,} | {seed['pmsa']:,} |"
        )
    if args.params_only:
        return

    rows = []
    checks = []
    for name in args.models:
        for fast in (False, True):
            precision = "bf16 + CL3d" if fast else "fp32"
            m = run_measured(inference, name, SIZE, fast, r)
            rows.append((name, f"inference {size_text}", precision, m.value, m.peak_mb))
            if not fast:
                checks.append(
                    (
                        name,
                        f"inference {size_text} peak <= {INFERENCE_LIMIT_MB} MB",
                        m.peak_mb,
                        m.peak_mb <= INFERENCE_LIMIT_MB,
                    )
                )
            m = run_measured(training, name, SIZE, fast, False, r)
            rows.append((name, f"training step {size_text}", precision, m.value, m.peak_mb))
            m = run_measured(training, name, SIZE, fast, True, r)
            rows.append((name, f"training step {size_text}, checkpointing", precision, m.value, m.peak_mb))
            if not fast:
                checks.append(
                    (
                        name,
                        f"checkpointed training step peak < {TRAINING_LIMIT_MB} MB",
                        m.peak_mb,
                        m.peak_mb < TRAINING_LIMIT_MB,
                    )
                )
        m = run_measured(inference, name, LARGE, False, 1)
        large_text = "x".join(map(str, LARGE))
        rows.append((name, f"inference {large_text}", "fp32", m.value, m.peak_mb))
        checks.append((name, f"inference {large_text} runs", m.peak_mb, True))

    print("\n## Time and peak memory (CPU, measured)\n")
    print("| model | pass | precision | time (s) | peak memory (MB) | seed peak GPU MB, 64x128x128 inference |")
    print("|---|---|---|---|---|---|")
    for name, what, precision, seconds, peak in rows:
        seed = f"{SEED[name]['peak']:,}" if what == f"inference {size_text}" and precision == "fp32" else ""
        print(f"| {name} | {what} | {precision} | {seconds:.2f} | {peak:,.0f} | {seed} |")

    print("\n## The issue's limits\n")
    for name, what, peak, ok in checks:
        print(f"- {name}: {what}: {peak:,.0f} MB -> {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
