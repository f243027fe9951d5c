"""`make bench`: every registered model at its standard input size, fp32 vs bf16 + channels-last.

Per model, batch 2 at the registry's input size: parameters, GFLOPs of one forward pass
(FlopCounterMode: convolutions and matrix products, a multiply-add = 2 FLOPs), forward (no grad, eval)
and training-step time (train mode, forward + backward of a surrogate loss, the mean of every float
output, + AdamW step), each in fp32 (default layout) and in bf16 autocast with the model and input in
channels_last(_3d), with freed host memory kept for reuse (`reuse_freed_memory`) around all the passes
of a measurement, as `mednets train` and `mednets predict` run. The four timings of a model run interleaved in one process (A B C D A B C D ...),
median of `--repeats` after one warm-up. Peak memory is measured separately, each pass in a fresh
child process (`mednets.reports.measure.run_measured`, resident memory above the child's baseline).
Achieved GFLOP/s (forward FLOPs / forward time) is shown as a share of this machine's peaks measured
in the same run: a 64->64 channel 3x3x3 conv3d on [2, 64, 48, 48, 48], fp32 in the default layout and
bf16 in channels_last_3d.

    make bench                                   # all models, writes the table into RESULTS.md and README.md
    .venv/bin/python benchmarks/run_all.py --models unet dynunet --repeats 5
    .venv/bin/python benchmarks/run_all.py --tiny --repeats 1       # seconds: a smoke run at tiny sizes

A second table is the training step of SADAAn (`sadaan_fast`) and LHA-Net (`lhanet_lightweight`) in
four variants, fp32 or bf16 + channels-last, gradient checkpointing off or on: step time (the four
interleaved in one process) and peak memory (fresh child per variant), with ratios to fp32 without
checkpointing (`--checkpointing-models` picks other models).

With `--write`, the tables replace the block between the `<!-- make bench -->` markers of
benchmarks/RESULTS.md and README.md (appended to RESULTS.md when it has none).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mednets.atomic import atomic_write_text
from mednets.host_memory import reuse_freed_memory
from mednets.models import create_model, get_model_spec, list_models
from mednets.models.base import memory_format_for
from mednets.reports.measure import (
    conv3d_peaks,
    count_flops,
    interleaved_medians,
    machine_description,
    run_measured,
)

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- make bench: start -->", "<!-- make bench: end -->"
VARIANTS = ("fp32", "bf16 + CL")
BATCH = 2  # batch norm in training mode needs more than one value per channel (SADAAn pools to 1 voxel)


def _surrogate_loss(outputs: Any) -> torch.Tensor:
    """Mean of every floating-point tensor in the outputs (tensor, dict or list of them)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().mean() if outputs.is_floating_point() else outputs.new_zeros((), dtype=torch.float32)
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return sum((_surrogate_loss(v) for v in values), torch.zeros(()))


def _build(name: str, tiny: bool, fast: bool, checkpointing: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (seeded) and a random input ``[BATCH, C, *size]``, both in channels-last when `fast`."""
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = create_model(name, **(spec.tiny_overrides if tiny else {}))
    model.set_gradient_checkpointing(checkpointing)
    x = torch.rand(BATCH, spec.in_channels, *(spec.tiny_input_size if tiny else spec.input_size))
    if fast:
        memory_format = memory_format_for(spec.spatial_dims)
        model = model.to(memory_format=memory_format)
        x = x.contiguous(memory_format=memory_format)
    return model, x


def _passes(model: torch.nn.Module, x: torch.Tensor, fast: bool) -> dict[str, Callable[[], None]]:
    """The forward pass and the training step of one variant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def precision() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if fast else contextlib.nullcontext()

    def forward() -> None:
        model.eval()
        with torch.no_grad(), precision():
            model(x)

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with precision():
            loss = _surrogate_loss(model(x))
        loss.backward()
        optimizer.step()

    return {"forward": forward, "training step": train_step}


def measured_pass(name: str, tiny: bool, fast: bool, kind: str, checkpointing: bool = False) -> None:
    """One warm-up and one timed call of a pass (run in a child process for its peak memory)."""
    model, x = _build(name, tiny, fast, checkpointing)
    run = _passes(model, x, fast)[kind]
    with reuse_freed_memory():
        run()
        run()


def bench_model(name: str, tiny: bool, repeats: int, peaks: dict[str, float]) -> list[str]:
    """Table rows of one model: one per variant."""
    model_fp32, x = _build(name, tiny, fast=False)
    model_fast, x_fast = _build(name, tiny, fast=True)
    params = sum(p.numel() for p in model_fp32.parameters())
    gflops = count_flops(model_fp32.eval(), x) / 1e9
    functions = {}
    for variant, (model, inputs) in zip(VARIANTS, ((model_fp32, x), (model_fast, x_fast)), strict=True):
        for kind, fn in _passes(model, inputs, fast=variant != "fp32").items():
            functions[(variant, kind)] = fn
    with reuse_freed_memory():  # one context around all passes: warm, as in a training run
        times = interleaved_medians(functions, repeats)  # type: ignore[arg-type]
    size = "x".join(map(str, x.shape))
    rows = []
    for variant in VARIANTS:
        fast = variant != "fp32"
        memory = {
            kind: run_measured(measured_pass, name, tiny, fast, kind).peak_mb for kind in ("forward", "training step")
        }
        forward, step = times[(variant, "forward")], times[(variant, "training step")]
        achieved = gflops / forward
        speedup = (
            f"{times[('fp32', 'forward')] / forward:.2f}x / {times[('fp32', 'training step')] / step:.2f}x"
            if fast
            else "1 / 1"
        )
        rows.append(
            f"| {name} | {size} | {params / 1e6:.2f}M | {gflops:.1f} | {variant} | {forward * 1e3:.0f} "
            f"| {step * 1e3:.0f} | {speedup} | {memory['forward']:.0f} / {memory['training step']:.0f} "
            f"| {achieved:.0f} | {achieved / peaks[variant]:.0%} |"
        )
    return rows


def table(models: list[str], tiny: bool, repeats: int) -> str:
    peaks = conv3d_peaks(repeats)
    command = " ".join([".venv/bin/python", "benchmarks/run_all.py", *sys.argv[1:]])
    lines = [
        f"Measured {datetime.date.today()} on {machine_description()}; `{command}`; "
        f"median of {repeats} interleaved passes after a warm-up. Peaks measured in the same run: "
        f"fp32 conv3d {peaks['fp32']:.0f} GFLOP/s, bf16 channels_last_3d conv3d {peaks['bf16 + CL']:.0f} GFLOP/s.",
        "",
        "| model | input | parameters | GFLOPs (forward) | precision | forward (ms) | training step (ms) "
        "| speed-up forward / step | peak MB forward / step | forward GFLOP/s | share of the precision's conv peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        lines.extend(bench_model(name, tiny, repeats, peaks))
        print(lines[-2], lines[-1], sep="\n", flush=True)
    return "\n".join(lines)


def checkpointing_table(models: list[str], tiny: bool, repeats: int) -> str:
    """Training step per model: fp32 / bf16 + CL x checkpointing off / on, ratios to fp32 without it."""
    variants = [(fast, checkpointing) for fast in (False, True) for checkpointing in (False, True)]
    lines = [
        "Training step (forward + backward + AdamW), batch 2 at the registry's input size; ratios to fp32 "
        "without checkpointing (time: higher is faster; memory: higher is leaner).",
        "",
        "| model | precision | checkpointing | training step (ms) | speed-up | peak MB | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models:
        functions = {}
        for fast, checkpointing in variants:
            model, x = _build(name, tiny, fast, checkpointing)
            functions[(fast, checkpointing)] = _passes(model, x, fast)["training step"]
        with reuse_freed_memory():  # one context around all passes: warm, as in a training run
            times = interleaved_medians(functions, repeats)  # type: ignore[arg-type]
        memory = {
            (fast, ckpt): run_measured(measured_pass, name, tiny, fast, "training step", ckpt).peak_mb
            for fast, ckpt in variants
        }
        base_time, base_memory = times[(False, False)], memory[(False, False)]
        for fast, checkpointing in variants:
            step, peak = times[(fast, checkpointing)], memory[(fast, checkpointing)]
            lines.append(
                f"| {name} | {VARIANTS[fast]} | {'on' if checkpointing else 'off'} | {step * 1e3:.0f} "
                f"| {base_time / step:.2f}x | {peak:.0f} | {base_memory / peak:.2f}x |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


def write_block(path: Path, text: str, *, append: bool) -> None:
    """Replace the marked block of `path` with `text` (or append a new block when `append`)."""
    content = path.read_text(encoding="utf-8")
    block = f"{START}\n{text}\n{END}"
    if START in content and END in content:
        content = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, content, flags=re.S)
    elif append:
        content = (
            content.rstrip("\n") + "\n\n## `make bench`: every model, fp32 vs bf16 + channels-last\n\n" + block + "\n"
        )
    else:
        return
    atomic_write_text(path, content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="registry names (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the registry's tiny builds (a smoke run)")
    parser.add_argument("--checkpointing-models", nargs="*", default=["sadaan_fast", "lhanet_lightweight"],
                        help="models of the checkpointing table (none: skip it)")  # fmt: skip
    parser.add_argument("--write", action="store_true", help="put the tables into RESULTS.md and README.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    text = table(args.models or list_models(), args.tiny, args.repeats)
    if args.checkpointing_models:
        text += "\n\n" + checkpointing_table(args.checkpointing_models, args.tiny, args.repeats)
    print("\n" + text)
    if args.write:
        write_block(ROOT / "benchmarks" / "RESULTS.md", text, append=True)
        write_block(ROOT / "README.md", text, append=False)


if __name__ == "__main__":
    main()
