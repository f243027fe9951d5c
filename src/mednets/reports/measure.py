"""Measuring, not estimating: peak memory of a piece of work, and its median time.

On CPU, peak memory is the peak resident set size of a fresh child process (spawned, so nothing of
the parent is inherited) above its baseline right after start-up; the child runs one function and
reports back. On CUDA, it is `torch.cuda.max_memory_allocated` around the function.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Measured", "run_measured", "median_time"]


@dataclass(frozen=True)
class Measured:
    """Result of `run_measured`: the function's return value and the memory it took."""

    value: Any
    peak_mb: float
    device: str


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _child(fn: Callable[..., Any], args: tuple, threads: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(threads)
    baseline = _peak_rss_mb()
    try:
        value = fn(*args)
        queue.put(("ok", value, _peak_rss_mb() - baseline))
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
