"""The request queue of `prodesc serve`: every request joins one running batch, token by token.

    batcher = Batcher({True: engine}, window_s=0.02, queue_size=256, on_step=metrics.step)
    batcher.submit(job, model=True)                  # raises QueueFull when queue_size jobs wait for a slot
    records = await job.future                       # job.cancel() when nobody waits any more

One thread (the model thread) owns the models. It loops: each engine with work takes a step (rows waiting for a
slot join with one prefill, then every live row gets a token; generate/continuous.py), so plain answers and
streams of any decoding settings share every step, and a new request waits for one step, not for a batch to end.
From idle it waits `window_s` first, so requests arriving together are prefilled together (with rows generating,
the engine gathers arrivals itself: serve.admit_wait_ms). The tokens a step handed out go to the event loop in one
call, from the engine's next step once that has launched its work on the device (`Engine.on_wait`): the loop's
Python then runs while the model thread waits for the GPU, not while it launches.

A job is a request's titles, one engine row each. A row is asked before every step whether it is still wanted:
a job cancelled (client gone) or past its deadline is dropped before it is prefilled, or stops within a token,
so nobody's abandoned answer holds the model. A job whose deadline cut it short gets `Expired`, never a partial
answer. The model thread reports each finished row to the event loop; a stream's tokens go to `job.on_token`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DONE = object()  # the last item of a stream's queue (an Exception instead when generation failed)


class QueueFull(Exception):
    """`queue_size` jobs wait for a slot already: answer 503 and let the client retry."""


class Expired(Exception):
    """The job's deadline passed before its answer was complete: answer 504."""


class ModelThreadDead(Exception):
    """The model thread ended on an error (`Batcher.dead`): nothing would generate a new job."""


@dataclass(eq=False)
class Job:
    """A queued request: its rows (engine `Row`s, one per title) and the future of its result, the list of
    `(tokens, finish_reason)` per title (a stream's future gives None as soon as its first token is out)."""

    titles: list[str]
    params: Hashable
    stream: bool
    deadline: float  # time.monotonic() by which the answer must be complete
    future: asyncio.Future
    rows: list[Any] = field(default_factory=list)
    neighbours: list[list[dict]] = field(default_factory=list)  # each title's catalog neighbours in its prompt
    prompt_tokens: list[int] = field(default_factory=list)
    on_token: Callable[[int], None] = lambda _: None  # a stream's tokens in order (on the event loop)
    # a stream's end (on the event loop): (tokens, finish_reason), Expired(), the step's exception, or None when
    # the client left
    on_done: Callable[[Any], None] = lambda _: None
    arrived: float = field(default_factory=time.monotonic)
    # Set from the event loop, read by the model thread before every step: a threading.Event, not the future.
    gone: threading.Event = field(default_factory=threading.Event)
    ended: dict[int, tuple[list[int], str]] = field(default_factory=dict)
    pieces: Any = None  # a stream's asyncio.Queue of text pieces (filled by the service's on_token/on_done)

    def cancel(self) -> None:
        """Nobody waits for the answer any more: skip the job, or stop generating it within a token."""
        self.gone.set()
        self.future.cancel()

    def wanted(self) -> bool:
        return not self.gone.is_set() and time.monotonic() < self.deadline


class Batcher:
    """Bounded queue + one model thread stepping the engines. Create it anywhere; it starts on first submit."""

    def __init__(self, engines: dict[Hashable, Any], *, window_s: float, queue_size: int,
                 on_step: Callable[[int, float], None] = lambda tokens, seconds: None,
                 on_row_end: Callable[[int], None] = lambda tokens: None) -> None:
        self.engines, self.window_s, self.queue_size = engines, window_s, queue_size
        self.on_step, self.on_row_end = on_step, on_row_end
        self._inbox: deque[tuple[Job, Hashable]] = deque()
        self._jobs: set[Job] = set()  # submitted, not ended
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: float | None = None  # the latest deadline of the step on the model thread, if any
        self._calls: list[tuple[Callable[..., Any], tuple]] = []  # model thread -> event loop, after each step
        self.dead: BaseException | None = None  # what ended the model thread, if an error did

    @property
    def depth(self) -> int:
        """Jobs with a title still waiting for a slot (those generating are not counted)."""
        waiting = {job for job, _ in list(self._inbox)}
        waiting |= {row.job for engine in list(self.engines.values()) for row in list(engine.waiting)}
        return sum(1 for job in waiting if job.wanted())

    def overdue(self) -> float:
        """Seconds the running step has run past its latest job's deadline (0: none, or in time)."""
        return max(time.monotonic() - self._running, 0.0) if self._running is not None else 0.0

    def submit(self, job: Job, model: Hashable) -> Job:
        """Queue a job (its rows built by the caller) for the engine `model`."""
        self._start()
        if self.dead is not None:
            raise ModelThreadDead(str(self.dead))
        if self.depth >= self.queue_size:
            raise QueueFull(f"{self.depth} requests wait for a slot (serve.queue_size={self.queue_size})")
        for i, row in enumerate(job.rows):
            row.job, row.deadline, row.wanted = job, job.deadline, job.wanted
            row.on_token = self._token_sink(job, row) if job.stream else row.on_token
            row.on_end = self._end_sink(job, i, row)
        self._jobs.add(job)
        self._inbox.append((job, model))
        self._wake.set()
        return job

    async def close(self) -> None:
        """Stop the model thread after its current step; pending jobs are cancelled."""
        self._closed = True
        self._wake.set()
        for job in list(self._jobs):
            job.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def _start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="prodesc-model", daemon=True)
            self._thread.start()

    # ---- the model thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        """The loop below; an error that escapes it (a bug: step errors fail their jobs and it goes on) is kept
        in `dead` for /healthz, and every pending job fails with it rather than wait for its deadline."""
        try:
            self._loop_steps()
        except BaseException as e:  # noqa: BLE001 - the thread ends; the server must say so
            log.error("model thread died", exc_info=e)
            self.dead = e
            for job in list(self._jobs):
                self._call(self._fail, job, e)
            self._flush()

    def _loop_steps(self) -> None:
        while not self._closed:
            busy = [key for key, engine in list(self.engines.items()) if engine.busy]
            if not busy and not self._inbox:
                self._wake.wait(1.0)
                self._wake.clear()
                if self._inbox and self.window_s > 0:
                    time.sleep(self.window_s)  # from idle: let requests that arrive together join one prefill
                continue
            self._take_inbox()
            for key in busy or list(self.engines):
                if self.engines[key].busy:
                    self._step(self.engines[key])

    def _take_inbox(self) -> None:
        while self._inbox:
            job, key = self._inbox.popleft()
            try:
                for row in job.rows:
                    self.engines[key].add(row)
            except Exception as e:  # noqa: BLE001 - a job the engine refuses fails alone; the thread goes on
                log.error("job refused by the engine", exc_info=e)
                engine, ids = self.engines.get(key), {id(row) for row in job.rows}
                if engine is not None:  # the rows added before the refusal go too
                    kept = [row for row in engine.waiting if id(row) not in ids]
                    engine.waiting.clear()
                    engine.waiting.extend(kept)
                self._call(self._fail, job, e)
                self._flush()

    def _step(self, engine: Any) -> None:
        rows = engine.rows + list(engine.waiting)
        self._running = max((r.deadline for r in rows), default=math.inf)
        waits = hasattr(engine, "on_wait")  # it hands the tokens over itself once its next step is on the device
        if waits:
            engine.on_wait = self._flush
        t0 = time.perf_counter()
        try:
            tokens = engine.step()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail these jobs, keep serving the next ones
            log.error("generation step failed", exc_info=e)
            for row in engine.fail():
                self._call(self._fail, row.job, e)
            self._flush()
            return
        finally:
            self._running = None
        if not (waits and engine.busy):
            self._flush()
        self.on_step(tokens, time.perf_counter() - t0)  # a token per row that took part

    def _token_sink(self, job: Job, row: Any) -> Callable[[int], None]:
        def on_token(token: int) -> None:  # model thread
            if len(row.tokens) == 1:
                self._call(_started, job)
            self._call(job.on_token, token)
        return on_token

    def _end_sink(self, job: Job, i: int, row: Any) -> Callable[[str], None]:
        def on_end(reason: str) -> None:  # model thread
            self.on_row_end(len(row.tokens))
            self._call(self._ended, job, i, list(row.tokens), reason)
        return on_end

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))  # handed over once per step: one wake-up of the loop, not one per row
        # (the real engine's on_wait: once its next step is launched, while it waits for the device; others: after
        # each step)

    def _flush(self) -> None:
        calls, self._calls = self._calls, []
        if calls and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_run_all, calls)

    # ---- back on the event loop ---------------------------------------------------------------------------------

    def _ended(self, job: Job, i: int, tokens: list[int], reason: str) -> None:
        job.ended[i] = (tokens, reason)
        if len(job.ended) < len(job.rows):
            return
        self._jobs.discard(job)
        if job.future.done() and not job.stream:  # cancelled: the client is gone
            return
        cut = any(reason == "cancelled" for _, reason in job.ended.values())
        result = Expired() if cut and time.monotonic() >= job.deadline else None
        if job.stream:
            _started(job)
            job.on_done(result if cut else job.ended[0])
        elif result is not None:
            job.future.set_exception(result)
        elif not cut:
            job.future.set_result([job.ended[k] for k in range(len(job.rows))])

    def _fail(self, job: Job, error: Exception) -> None:
        if job not in self._jobs:  # a job of several rows fails once
            return
        self._jobs.discard(job)
        if job.stream and job.future.done():
            job.on_done(error)
        elif not job.future.done():
            job.future.set_exception(error)


def _run_all(calls: list[tuple[Callable[..., Any], tuple]]) -> None:
    for fn, args in calls:
        fn(*args)


def _started(job: Job) -> None:
    if not job.future.done():
        job.future.set_result(None)
