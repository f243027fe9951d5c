"""Work over cases in worker processes, with a progress bar; one failing case does not stop the others.

Workers are spawned (not forked): a process forked from one that has run torch's OpenMP thread pool
can hang, and nothing here may hang. Each worker runs torch on one thread, so `workers` processes use
`workers` cores.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["default_workers", "map_cases"]

Item = TypeVar("Item")


def default_workers(count: int) -> int:
    """One worker per core this process may use, at most one per item."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, count))


def _single_threaded() -> None:
    import torch

    torch.set_num_threads(1)


def map_cases(
    function: Callable[[Item], Any],
    items: Sequence[Item],
    *,
    workers: int | None = None,
    desc: str = "cases",
    progress: bool = True,
) -> Iterator[tuple[Item, Any, BaseException | None]]:
    """Run `function(item)` for every item; yield `(item, result, error)` as each finishes.

    `error` is the exception a case raised (its result None); the other cases go on. With one worker
    (or one item) everything runs in this process, in order. At most `2 * workers` items are queued at
    once, so a long list does not hold every pending result in memory.
    """
    from tqdm.auto import tqdm

    workers = default_workers(len(items)) if workers is None else max(1, min(workers, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress or len(items) < 2, leave=False)
    try:
        if workers == 1:
            for item in items:
                try:
                    result, error = function(item), None
                except Exception as caught:  # reported to the caller with its case
                    result, error = None, caught
                bar.update()
                yield item, result, error
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded) as pool:
            pending: dict[Future, Item] = {}
            queue = iter(items)
            while True:
                while len(pending) < 2 * workers and (item := next(queue, None)) is not None:
                    pending[pool.submit(function, item)] = item
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    item = pending.pop(future)
                    error = future.exception()
                    bar.update()
                    yield item, None if error else future.result(), error
    finally:
        bar.close()
