"""The request queue of `prodesc serve`: requests that arrive together share one generation call.

    batcher = Batcher(run_batch, run_stream, max_batch_size=32, window_s=0.02, queue_size=256)
    job = batcher.submit(["Red Mug"], params, deadline)     # raises QueueFull when the queue is full
    records = await job.future                              # job.cancel() when nobody waits any more
    pieces = await batcher.submit(["Red Mug"], params, deadline, stream=True).future  # asyncio.Queue: str.., DONE

One asyncio task takes jobs in arrival order and hands them to a single worker thread, the only thread that
touches the model. For a plain job it waits up to `window_s` after that job arrived (less if `max_batch_size`
titles with the same decoding params are already queued), then runs every queued job with the same params as one
`run_batch(titles, params)` call. Jobs with other params keep their place for the next round. A streaming job runs
alone: `run_stream(title, params, emit)` pushes pieces that reach the request through the job's queue.

A job cancelled (client gone, timeout) before its turn is dropped without generating: that is how a
disconnected client frees its slot. Once generating, every job is asked after each token whether it is still
wanted (`stop` of run_batch/run_stream): a cancelled job, or one past its deadline, stops within a token, and a
call whose jobs have all stopped returns, so nobody's abandoned answer holds the model thread. A job that reached
its deadline gets `Expired` instead of a cut-short answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DONE = object()  # the last item of a stream's queue (an Exception instead when generation failed)

# (titles, params, stop) -> one result per title, in order; stop(i) is True once title i's answer is unwanted
RunBatch = Callable[[list[str], Any, Callable[[int], bool]], list[Any]]
RunStream = Callable[[str, Any, Callable[[Any], None], Callable[[], bool]], None]  # (title, params, emit, stop)


class QueueFull(Exception):
    """The queue holds `queue_size` jobs already: answer 503 and let the client retry."""


class Expired(Exception):
    """The job's deadline passed before its answer was complete: answer 504."""


@dataclass(eq=False)
class Job:
    """A queued request. `future` gives its results (a stream: its queue of pieces, as soon as it starts)."""

    titles: list[str]
    params: Hashable
    stream: bool
    deadline: float  # time.monotonic() by which the answer must be complete
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    # Set from the event loop, read by the model thread after every token: a threading.Event, not the future.
    gone: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Nobody waits for the answer any more: skip the job, or stop generating it within a token."""
        self.gone.set()
        self.future.cancel()

    def wanted(self) -> bool:
        return not self.gone.is_set() and time.monotonic() < self.deadline


class Batcher:
    """Bounded queue + collection window + one model thread. Create it anywhere; it starts on first submit."""

    def __init__(self, run_batch: RunBatch, run_stream: RunStream, *, max_batch_size: int, window_s: float,
                 queue_size: int) -> None:
        self.run_batch, self.run_stream = run_batch, run_stream
        self.max_batch_size, self.window_s, self.queue_size = max_batch_size, window_s, queue_size
        self._pending: deque[Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prodesc-model")
        self._running: float | None = None  # the latest deadline of the call on the model thread, if any

    @property
    def depth(self) -> int:
        """Jobs waiting for the model (the one running is not counted)."""
        return sum(not job.future.done() for job in self._pending)

    def overdue(self) -> float:
        """Seconds the running generation call has run past its latest job's deadline (0: none, or in time)."""
        return max(time.monotonic() - self._running, 0.0) if self._running is not None else 0.0

    def submit(self, titles: list[str], params: Hashable, deadline: float, stream: bool = False) -> Job:
        """Queue a job that must be answered by `deadline` (time.monotonic())."""
        self._start()
        self._drop_cancelled()
        if len(self._pending) >= self.queue_size:
            raise QueueFull(f"{len(self._pending)} requests queued (serve.queue_size={self.queue_size})")
        job = Job(list(titles), params, stream, deadline, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._arrived.set()
        return job

    async def close(self) -> None:
        """Stop taking jobs; the running generation (if any) finishes in its thread."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="prodesc-batcher")

    async def _loop(self) -> None:
        while True:
            first = await self._next()
            try:
                if first.stream:
                    self._pending.popleft()
                    await self._stream(first)
                    continue
                await self._collect(first)
                await self._batch(self._take(first.params))
            except Exception:  # a bug here must not stop the server: log it and serve the next job
                log.exception("batcher: unexpected error")

    async def _next(self) -> Job:
        while True:
            self._drop_cancelled()
            if self._pending:
                return self._pending[0]
            self._arrived.clear()
            await self._arrived.wait()

    async def _collect(self, first: Job) -> None:
        """Wait out the window that opened when `first` arrived, unless a full batch is already queued."""
        deadline = first.arrived + self.window_s
        while self._queued_titles(first.params) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take(self, params: Hashable) -> list[Job]:
        """Remove the live jobs with `params` (up to max_batch_size titles, at least one job) in order."""
        batch, keep, n = [], deque(), 0
        for job in self._pending:
            if job.future.done():
                continue
            fits = not batch or n + len(job.titles) <= self.max_batch_size
            if not job.stream and job.params == params and fits:
                batch.append(job)
                n += len(job.titles)
            else:
                keep.append(job)
        self._pending = keep
        return batch

    async def _batch(self, batch: list[Job]) -> None:
        if not batch:
            return
        titles = [t for job in batch for t in job.titles]
        owners = [job for job in batch for _ in job.titles]

        def stop(i: int) -> bool:  # called from the model thread after every token
            return not owners[i].wanted()

        try:
            results = await self._on_model_thread(batch, self.run_batch, titles, batch[0].params, stop)
        except Exception as e:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        start = 0
        for job in batch:
            if job.future.done():  # cancelled while generating: the client is gone
                pass
            elif time.monotonic() >= job.deadline:  # its rows were cut short at the deadline
                job.future.set_exception(Expired())
            else:
                job.future.set_result(results[start:start + len(job.titles)])
            start += len(job.titles)

    async def _stream(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job.future.set_result(pieces)

        def emit(item: Any) -> None:  # called from the model thread
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        def stop() -> bool:
            return not job.wanted()

        try:
            await self._on_model_thread([job], self.run_stream, job.titles[0], job.params, emit, stop)
        except Exception as e:
            pieces.put_nowait(e)
            return
        pieces.put_nowait(Expired() if time.monotonic() >= job.deadline else DONE)  # after every emitted piece

    async def _on_model_thread(self, jobs: list[Job], fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the model thread, remembering the call's deadline for `overdue()` (health)."""
        self._running = max(job.deadline for job in jobs)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._running = None

    def _queued_titles(self, params: Hashable) -> int:
        return sum(len(j.titles) for j in self._pending if not j.stream and j.params == params
                   and not j.future.done())

    def _drop_cancelled(self) -> None:
        if any(job.future.done() for job in self._pending):
            self._pending = deque(job for job in self._pending if not job.future.done())
