"""Measuring, not estimating: peak memory of a piece of work, and its median time.

On CPU, peak memory is the peak resident set size of a fresh child process (spawned, so nothing of
the parent is inherited) above its resident size right before the measured function runs (the
kernel's peak mark is reset first, Linux `/proc/self/clear_refs`); the child runs one function and
reports back. On CUDA, it is `torch.cuda.max_memory_allocated` around the function.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Measured", "run_measured", "median_time", "count_flops", "machine_description"]


@dataclass(frozen=True)
class Measured:
    """Result of `run_measured`: the function's return value and the memory it took."""

    value: Any
    peak_mb: float
    device: str


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so start-up transients don't count."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _child(fn: Callable[..., Any], args: tuple, threads: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(threads)
    try:
        _reset_peak_rss()
        baseline = _status_mb("VmRSS")
        value = fn(*args)
        queue.put(("ok", value, _status_mb("VmHWM") - baseline))
    except BaseException as error:  # report any failure to the parent instead of hanging it
        queue.put(("error", f"{type(error).__name__}: {error}", 0.0))


def run_measured(fn: Callable[..., Any], *args: Any, device: str = "cpu", threads: int | None = None) -> Measured:
    """Run `fn(*args)` and measure its peak memory in MB.

    On CPU `fn` runs in a spawned child process, so it and its arguments must be picklable
    (a module-level function); the peak counts everything `fn` allocates (model, activations,
    gradients, optimizer state) above the child's start-up baseline (Python + torch imported).

    Raises:
        RuntimeError: `fn` failed in the child (the message carries the child's error).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        value = fn(*args)
        torch.cuda.synchronize()
        return Measured(value, (torch.cuda.max_memory_allocated() - start) / 2**20, device)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(fn, args, threads or torch.get_num_threads(), queue))
    process.start()
    status, value, peak_mb = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"measured run failed in the child process: {value}")
    return Measured(value, peak_mb, device)


def median_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(module: nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward pass of `module(*inputs)`, counted by `torch.utils.flop_counter`.

    A multiply-add counts as 2 FLOPs; convolutions, matrix products and attention are counted,
    element-wise work (bias, normalisation, activations) is not.
    """
    # Under no_grad a view of a parameter still requires grad but has no grad_fn (SADAAn's expanded
    # position prior), which the counter's module tracker cannot hook: count with gradients off.
    flags = [(p, p.requires_grad) for p in module.parameters()]
    counter = FlopCounterMode(display=False)
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        with counter, torch.no_grad():
            module(*inputs)
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
    return int(counter.get_total_flops())


def machine_description() -> str:
    """CPU model (or CUDA device), cores and torch version, for the header of benchmark tables."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", CUDA device {torch.cuda.get_device_name()}"
    return text
