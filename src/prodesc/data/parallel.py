"""Worker processes for `prodesc data` (prepare, synth): a bounded, ordered map over chunks, and clean stops.

with worker_pool(worker_count(total_bytes)) as pool:
    for result in ordered_map(pool, fn, tasks, in_flight=4):
        ...

Large inputs can reach the workers through `shared_slots` (made before the pool forks) instead of the pipe.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

PARALLEL_MIN_BYTES = 32 << 20  # below this, worker start-up costs more than it saves
MAX_AUTO_WORKERS = 8  # past this the parent (gunzip, cutting blocks) cannot feed more: see docs/PERFORMANCE.md
# fork on Linux: spawn would re-run the caller's __main__ (scripts without an `if __name__ == "__main__"` guard
# break), and forked workers inherit `shared_slots`.
_START_METHOD = "fork" if sys.platform == "linux" else "spawn"


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` processes (None for 1), started now: before the caller opens files or starts threads.

    Forked on Linux (see _START_METHOD). Workers ignore Ctrl-C: the parent stops them, after their current task.
    Workers die with the parent, even when it is killed with SIGKILL and can clean nothing up (`_die_with`).
    Keep task results small (a few KiB pickled): a worker killed while sending a large one leaves half a message
    in the pipe, and concurrent.futures then waits for the rest forever.
    """
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context(_START_METHOD)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        pool.submit(int).result()
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits terminate_as_interrupt's handler
    _die_with(parent)


def _die_with(parent: int) -> None:
    """End this worker when process `parent` ends. An orphan would go on reading shared memory and writing parts
    into a temporary dir that the next run deletes, holding a core and memory for nothing.

    Linux: the kernel sends SIGKILL when the thread that forked us exits (PR_SET_PDEATHSIG; the pool is made by
    the caller's thread, which outlives it). Elsewhere a daemon thread polls the parent pid once a second."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal would ever come
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


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


class SharedSlots:
    """Fixed-size slots in one anonymous shared mapping, inherited by workers forked after it was made.

    A block goes to a worker as (slot, length): `put` copies it in, the worker's `take` copies it out (~0.1 ms
    per 4 MiB each), where pickling it through the pipe cost ~2 CPU-seconds per corpus in the parent alone.
    Task i uses slot i % slots, written again by task i + slots: safe because `ordered_map` keeps fewer than
    `slots` tasks in flight, and a task is done before its result comes back."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self.mm = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children

    def put(self, i: int, data: bytes) -> int | None:
        """Copy data into task i's slot; the slot, or None when data is larger than a slot (send it as is)."""
        if len(data) > self.slot_bytes:
            return None
        slot = i % self.slots
        start = slot * self.slot_bytes
        self.mm[start : start + len(data)] = data
        return slot

    def take(self, slot: int, n: int) -> bytes:
        start = slot * self.slot_bytes
        return self.mm[start : start + n]


_SLOTS: SharedSlots | None = None  # set by shared_slots in the parent, inherited by forked workers


@contextmanager
def shared_slots(in_flight: int, slot_bytes: int, workers: int) -> Iterator[SharedSlots | None]:
    """Slots for `ordered_map(..., in_flight)` over `workers` processes: enter before `worker_pool`.
    None for one process, or where workers are spawned (not forked) and could not inherit the mapping."""
    global _SLOTS
    if workers <= 1 or _START_METHOD != "fork":
        yield None
        return
    _SLOTS = SharedSlots(in_flight + 1, slot_bytes)
    try:
        yield _SLOTS
    finally:
        _SLOTS.mm.close()
        _SLOTS = None


def take_shared(slot: int, n: int) -> bytes:
    """In a worker: the n bytes the parent put in `slot`."""
    if _SLOTS is None:
        raise RuntimeError("take_shared outside a worker forked inside shared_slots")
    return _SLOTS.take(slot, n)


def worker_count(total_bytes: int, requested: int = 0) -> int:
    """`requested` processes if set (1: none), else one per CPU core, at most MAX_AUTO_WORKERS; 1 for small inputs."""
    if requested:
        return requested
    if total_bytes < PARALLEL_MIN_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_AUTO_WORKERS))
