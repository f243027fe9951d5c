"""ONNX export: onnxruntime vs mednets PyTorch fp32 vs bf16 + channels_last forward time, same network, CPU.

Usage (under the heavy-job lock):

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_onnx.py [--repeats 5] [--models NAME ...]

Each model is built at its default width (seeded random weights) and exported with
`mednets.engine.export.export_onnx` at batch 1 and its standard input size (LHA-Net lightweight
and DynUNet at their registry sizes, the 2D UNet with one channel at 256x256, as the 2D configs
train it). Three variants of the same network then run no-grad forwards:

- onnxruntime: CPUExecutionProvider, `intra_op_num_threads=2`, default graph optimisations;
- PyTorch fp32: the mednets model, contiguous memory format;
- PyTorch bf16 + channels_last: `torch.autocast("cpu", dtype=torch.bfloat16)`, model and input in
  `channels_last_3d` (`channels_last` for 2D), as `mednets predict` and training run.

After one warm-up pass each, the passes are interleaved (A B C A B C ...) so that load from other
processes hits all three alike; the table gives the median of `--repeats` passes. Parity is the max
abs difference of the outputs, onnxruntime and bf16 each against PyTorch fp32.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from mednets.engine.export import INPUT_NAME, export_onnx
from mednets.models import create_model, get_model_spec
from mednets.models.base import memory_format_for
from mednets.reports.measure import machine_description

THREADS = 2
# model name -> (builder overrides, input shape [B, C, *S])
BENCHMARKS = {
    "lhanet_lightweight": ({}, (1, 1, *get_model_spec("lhanet_lightweight").input_size)),
    "dynunet": ({}, (1, 1, *get_model_spec("dynunet").input_size)),
    "unet": ({"in_channels": 1}, (1, 1, 256, 256)),
}


def _variants(name: str, folder: Path) -> tuple[dict[str, Callable[[], np.ndarray]], float]:
    """The three forward passes of one network (each returns its output) and the size of its .onnx file in MB."""
    overrides, shape = BENCHMARKS[name]
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    path = export_onnx(model, x, folder / f"{name}.onnx", model_name=name)

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fast_model = copy.deepcopy(model).to_channels_last()
    fast_x = x.contiguous(memory_format=memory_format_for(x.ndim - 2))

    def onnx_runtime() -> np.ndarray:
        return session.run(None, {INPUT_NAME: x.numpy()})[0]

    def torch_fp32() -> np.ndarray:
        with torch.no_grad():
            return model(x).numpy()

    def torch_bf16() -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fast_model(fast_x).float().numpy()

    variants = {"onnxruntime fp32": onnx_runtime, "torch fp32": torch_fp32, "torch bf16 + CL": torch_bf16}
    return variants, os.path.getsize(path) / 2**20


def _interleaved(variants: dict[str, Callable[[], np.ndarray]], repeats: int) -> tuple[dict, dict]:
    """Median seconds per variant over `repeats` interleaved passes after one warm-up each, and the outputs."""
    outputs = {label: forward() for label, forward in variants.items()}  # warm-up
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(repeats):
        for label, forward in variants.items():
            start = time.perf_counter()
            forward()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(seconds) for label, seconds in times.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per variant (median)")
    parser.add_argument("--models", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            variants, megabytes = _variants(name, Path(folder))
            medians, outputs = _interleaved(variants, args.repeats)
            reference = outputs["torch fp32"]
            parity = {label: float(np.abs(out - reference).max()) for label, out in outputs.items()}
            rows.append((name, BENCHMARKS[name][1], medians, parity, megabytes))

    print(f"# ONNX export: onnxruntime vs PyTorch, batch 1, {datetime.date.today()}")
    print(f"\n{machine_description()}, onnxruntime {onnxruntime.__version__}")
    print(f"\n1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    command = " ".join(["flock /tmp/mednets-heavy.lock .venv/bin/python", *sys.argv])
    print(f"\n`{command}`; median of {args.repeats} interleaved passes after 1 warm-up\n")
    print(
        "| model | input | onnxruntime fp32 (ms) | torch fp32 (ms) | torch bf16 + CL (ms) | torch fp32 / onnxruntime "
        "| torch fp32 / bf16 | bf16 / onnxruntime | max abs diff onnxruntime vs fp32 | max abs diff bf16 vs fp32 "
        "| .onnx (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, medians, parity, size in rows:
        ort, fp32, bf16 = (medians[k] * 1000 for k in ("onnxruntime fp32", "torch fp32", "torch bf16 + CL"))
        print(
            f"| {name} | {'x'.join(map(str, shape))} | {ort:.0f} | {fp32:.0f} | {bf16:.0f} | {fp32 / ort:.2f}x "
            f"| {fp32 / bf16:.2f}x | {bf16 / ort:.2f}x | {parity['onnxruntime fp32']:.1e} "
            f"| {parity['torch bf16 + CL']:.1e} | {size:.1f} |"
        )
    print("\nRatios are time ratios: above 1, the second named runs faster.")


if __name__ == "__main__":
    main()
