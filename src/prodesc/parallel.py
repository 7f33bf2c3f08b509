"""Worker processes for `prodesc data` (prepare, synth): a bounded, ordered map over chunks, and clean stops.

with worker_pool(worker_count(total_bytes)) as pool:
    for result in ordered_map(pool, fn, tasks, in_flight=4):
        ...
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

PARALLEL_MIN_BYTES = 32 << 20  # below this, worker start-up costs more than it saves


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout, docker stop) unwinds like Ctrl-C, so the temporary directory is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` processes (None for 1), started now: before the caller opens files or starts threads.

    fork on Linux: spawn would re-run the caller's __main__ (scripts without an `if __name__ == "__main__"`
    guard break). Workers ignore Ctrl-C: the parent stops them, after their current task. Keep task results
    small (a few KiB pickled): a worker killed while sending a large one leaves half a message in the pipe,
    and concurrent.futures then waits for the rest forever.
    """
    if workers <= 1:
        yield None
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_worker_init)
    try:
        pool.submit(int).result()
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits terminate_as_interrupt's handler


def ordered_map(pool: ProcessPoolExecutor | None, fn: Callable, tasks: Iterator, in_flight: int) -> Iterator:
    """fn over tasks, results in task order; at most `in_flight` tasks queued, so memory stays bounded."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def worker_count(total_bytes: int) -> int:
    if total_bytes < PARALLEL_MIN_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 4))
