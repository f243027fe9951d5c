"""Measuring, not estimating: peak memory of a piece of work, and its median time.

On CPU, peak memory is the peak resident set size of a fresh child process (spawned, so nothing of
the parent is inherited) above its resident size right before the measured function runs (the
kernel's peak mark is reset first, Linux `/proc/self/clear_refs`); the child runs one function and
reports back. On CUDA, it is `torch.cuda.max_memory_allocated` around the function. `tensor_peak_mb`
measures the peak of live tensors alone on any device (torch's `MemTracker`, a dispatch mode that
follows every tensor storage), the CPU's counterpart of `max_memory_allocated`.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mednets.host_memory import reuse_freed_memory

__all__ = [
    "Measured",
    "run_measured",
    "median_time",
    "interleaved_medians",
    "conv3d_peaks",
    "count_flops",
    "machine_description",
    "tensor_peak_mb",
]


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


def tensor_peak_mb(
    step: Callable[[], Any], *external: nn.Module | torch.optim.Optimizer | torch.Tensor
) -> float | None:
    """Peak MB of live tensors (all devices) while `step()` runs, counting those of `external` made before it.

    Measured with `torch.distributed._tools.mem_tracker.MemTracker` (tensor storages only: no allocator
    cache, kernel workspace or runtime); None where this torch build lacks it.
    """
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a torch built without torch.distributed
        return None
    tracker = MemTracker()
    tracker.track_external(*external)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its module tracker warns about modules without a backward hook
        with tracker:
            step()
    peaks = tracker.get_tracker_snapshot("peak")
    return sum(categories.get("Total", 0) for categories in peaks.values()) / 2**20


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


def interleaved_medians(functions: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Median seconds of each function, called in turn (A B C A B C ...) after one warm-up round, so
    slow drifts of the machine (heat, other load) hit every function alike."""
    times: dict[Any, list[float]] = {name: [] for name in functions}
    for _ in range(repeats + 1):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def conv3d_peaks(repeats: int) -> dict[str, float]:
    """The machine's practical convolution peaks in GFLOP/s: a 64->64 channel 3x3x3 conv3d on
    [2, 64, 48, 48, 48], `"fp32"` in the default layout and `"bf16 + CL"` in bf16 channels_last_3d,
    with freed memory kept for reuse (`reuse_freed_memory`) so that page faults do not lower the peak."""
    conv = nn.Conv3d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(2, 64, 48, 48, 48)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    flops = 2 * 64 * 64 * 27 * x[:, 0].numel()

    def fp32() -> None:
        with torch.no_grad():
            conv(x)

    def bf16() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            conv_cl(x_cl)

    with reuse_freed_memory():
        times = interleaved_medians({"fp32": fp32, "bf16 + CL": bf16}, repeats)
    return {name: flops / seconds / 1e9 for name, seconds in times.items()}


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
