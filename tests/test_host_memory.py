"""`reuse_freed_memory`: freed large blocks are reused (no page faults), and the defaults come back."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mednets import host_memory
from mednets.host_memory import reuse_freed_memory

BLOCK_BYTES = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): mmapped by default
PAGES = BLOCK_BYTES // 4096


def _page_faults_of_new_block() -> int:
    """Minor page faults taken while allocating and filling one 64 MiB tensor."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(BLOCK_BYTES // 4)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del block
    return after - before


@pytest.mark.skipif(host_memory._LIBC is None, reason="glibc only: elsewhere reuse_freed_memory changes nothing")
def test_freed_block_is_reused_without_page_faults() -> None:
    # In a fresh process: threads and heap left by other tests (loaders, writers) take freed pages too.
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_host_memory as t; "
        "from mednets.host_memory import reuse_freed_memory\n"
        "with reuse_freed_memory():\n    print(json.dumps([t._page_faults_of_new_block() for _ in range(12)]))"
    )
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True,
                            text=True, check=True, timeout=120)  # fmt: skip
    # The first blocks grow the heap (small objects may settle in the first freed ones, for a few
    # blocks); then a new block takes the pages of the last one. Glibc's default faults every page in,
    # every time (PAGES faults per block): then no block of the last four would come in cheap.
    faults = json.loads(result.stdout)
    assert sorted(faults[-4:])[1] < PAGES // 20, faults


class _RecordingLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_nested_contexts_restore_the_defaults_once_at_the_outermost_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _RecordingLibc()
    monkeypatch.setattr(host_memory, "_LIBC", libc)
    keep = [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
    restore = [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]
    with reuse_freed_memory():
        assert libc.calls == keep
        with reuse_freed_memory():
            pass
        assert libc.calls == keep  # the inner exit leaves the setting on
    assert libc.calls == keep + restore


def test_defaults_come_back_when_the_body_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _RecordingLibc()
    monkeypatch.setattr(host_memory, "_LIBC", libc)
    with pytest.raises(RuntimeError), reuse_freed_memory():
        raise RuntimeError("boom")
    assert libc.calls[-1] == ("malloc_trim", 0)
    assert host_memory._depth == 0


def test_no_glibc_means_no_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "_LIBC", None)

    @reuse_freed_memory()
    def double(x: int) -> int:
        return 2 * x

    assert double(3) == 6
