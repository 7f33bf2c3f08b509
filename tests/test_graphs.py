"""generate/graphs.py on a CPU box: the capture's protocol with torch.cuda's pieces faked (no GPU here)."""

from __future__ import annotations

import contextlib
import gc

import torch

from prodesc.generate.graphs import StepGraphs


class _FakeStream:
    def wait_stream(self, other: object) -> None:
        pass


class _FakeGraph:
    def replay(self) -> None:
        pass


def test_no_garbage_collection_while_a_graph_is_captured(monkeypatch) -> None:
    """A collection inside a capture can destroy another engine's graph, which CUDA forbids while a stream
    captures: that invalidated a capture on an H100 and turned the engine's graphs off. The capture itself must run
    with the collector off, and leave it as it found it."""
    seen: dict[str, object] = {}

    @contextlib.contextmanager
    def graph(g: object, capture_error_mode: str = "global"):
        seen["collecting"], seen["mode"] = gc.isenabled(), capture_error_mode
        yield

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    calls = []
    graphs = StepGraphs(lambda b, w: calls.append((b, w)) or torch.zeros(b, w), compile=False)
    assert gc.isenabled()
    assert graphs.capture(4, 1)
    assert seen == {"collecting": False, "mode": "thread_local"}
    assert gc.isenabled()  # back on afterwards
    assert calls == [(4, 1)] * 3  # two warm-up runs, then the captured one
    assert graphs.replay(4, 1).shape == (4, 1)
