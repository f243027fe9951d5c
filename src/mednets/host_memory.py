"""Keep freed host memory for reuse while a network runs on the CPU (glibc's malloc).

glibc serves every block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and hands it
back to the kernel on ``free``. A 3D network's activations are tens of MB each, so without this every
layer of every window page-faults its output in, 4 KiB at a time (its cost is measured by
``benchmarks/bench_host_memory.py``, figures in benchmarks/RESULTS.md). It is the reason Intel's PyTorch CPU guide preloads jemalloc
or tcmalloc; this does the same without a preload.

Inside `reuse_freed_memory()` large blocks come from the heap and freed ones stay there for the next
layer; on leaving the outermost context glibc's defaults come back and ``malloc_trim(0)`` returns the
free pages to the kernel, so a long-lived process does not keep its inference peak. On other C
libraries (macOS, musl, Windows) it changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["reuse_freed_memory", "total_memory_bytes"]

# mallopt parameters and glibc's defaults (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_ALL = 2**31 - 1  # trim threshold while inside: mallopt takes a C int


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it alone has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


_LIBC = _glibc()
_lock = threading.Lock()
_depth = 0


def _set(keep: bool) -> None:
    assert _LIBC is not None
    _LIBC.mallopt(_M_MMAP_MAX, 0 if keep else _DEFAULT_MMAP_MAX)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL if keep else _DEFAULT_TRIM_THRESHOLD)
    if not keep:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Serve large host allocations from the heap and keep freed ones for reuse (glibc; a no-op elsewhere).

    Re-entrant and thread-safe: the defaults come back, and free pages go back to the kernel, when
    the outermost context ends.
    """
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(keep=True)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(keep=False)


def total_memory_bytes() -> int:
    """This machine's physical memory in bytes (the planner's and preprocessing's memory limits start from it)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
