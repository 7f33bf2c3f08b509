"""The serving engine's decode step as CUDA graphs: one per (batch bucket, step width), captured in
`capture_error_mode="thread_local"` (another thread's CUDA work, such as a second model loading or the event loop
embedding titles, cannot break a capture), the one-token step's forward optionally compiled first (verify steps
of width > 1 stay eager inside their graphs).

    graphs = StepGraphs(engine._step_forward, compile=True)
    graphs.capture(8, 1)        # warm-up runs (compiling), then the capture; False once graphs are off
    logits = graphs.replay(8, 5)
    graphs.timings()            # {(bucket, width): seconds a replay takes}

A compiled step that fails to compile or capture falls back to the eager step (graphs captured so far are
dropped: all are captured again); a capture of the eager step that fails turns graphs off for good; a warning each.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class StepGraphs:
    """CUDA graphs of `step(b, w)`, a function of the batch bucket and step width that reads and writes only
    persistent device buffers (so a replay acts on their current contents) and returns the logits."""

    def __init__(self, step: Callable[[int, int], Any], compile: bool) -> None:
        self.step, self.compile, self.on = step, compile, True
        self.captured: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._compiled = _compiled(step) if compile else None

    def _fn(self, b: int, w: int) -> Any:
        """The one-token step compiled (when `compile`), verify steps (w > 1) eager: each compiled width costs two
        compiles at start-up (batch 1 and the rest; SmolLM2's two took most of a 160 s warm-up on an H100), and
        speculation's measured gains (docs/PERFORMANCE.md) come from eager verify steps."""
        return (self._compiled if self.compile and w == 1 else self.step)(b, w)

    def replay(self, b: int, w: int) -> Any:
        """The step's logits (its graph captured now if not yet); None when graphs are off."""
        if (b, w) not in self.captured and not self.capture(b, w):
            return None
        graph, out = self.captured[(b, w)]
        graph.replay()
        return out

    def capture(self, b: int, w: int) -> bool:
        import torch

        while True:
            try:
                self.captured[(b, w)] = self._capture(b, w)
                return True
            except Exception as e:  # noqa: BLE001 - eager decoding still answers, only slower
                torch.cuda.synchronize()
                if self.compile:
                    log.warning("compiled decode step failed (%s: %s): capturing it uncompiled", type(e).__name__, e)
                    self.compile, self.captured = False, {}
                    continue
                log.warning("CUDA graph capture failed (%s: %s): decoding eagerly", type(e).__name__, e)
                self.on = False
                return False

    def timings(self, repeat: int = 5) -> dict[tuple[int, int], float]:
        """Seconds each captured step takes on the device (mean of `repeat` replays after one)."""
        import torch

        out = {}
        for key, (graph, _) in self.captured.items():
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                graph.replay()
            end.record()
            end.synchronize()
            out[key] = start.elapsed_time(end) / repeat / 1000
        return out

    def _capture(self, b: int, w: int) -> tuple[Any, Any]:
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (compiling, lazy inits, cuBLAS handles)
            for _ in range(2):
                self._fn(b, w)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing (`torch.cuda.graph` collects once before it starts): a collection
        # inside the capture can free another engine's graph, whose destruction is not permitted while a stream
        # captures, and that invalidates this capture (seen on an H100: a benchmark's discarded engine, collected
        # mid-capture, turned the next engine's graphs off)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._fn(b, w)
        finally:
            if collecting:
                gc.enable()
        log.info("decode step captured as a CUDA graph for batch bucket %d, width %d", b, w)
        return graph, out


def _compiled(fn: Callable[[int, int], Any]) -> Callable[[int, int], Any]:
    """`fn` through torch.compile, the batch size dynamic (one compile for every bucket but 1) and without its own
    CUDA graphs: they are captured here, per bucket and width."""
    import torch

    return torch.compile(fn, dynamic=True, mode="default")
