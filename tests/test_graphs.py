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


def test_only_the_one_token_step_is_compiled(monkeypatch) -> None:
    """Each compiled width costs two compiles at start-up (SmolLM2's two: most of a 160 s warm-up): the one-token step
    is compiled, verify steps (width > 1) are captured eager, as speculation's gains were measured."""
    from prodesc.generate import graphs as module

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, capture_error_mode="global": contextlib.nullcontext())
    calls = []
    monkeypatch.setattr(module, "_compiled", lambda fn: lambda b, w: calls.append(("compiled", b, w)) or fn(b, w))
    graphs = StepGraphs(lambda b, w: calls.append(("eager", b, w)) or torch.zeros(b, w), compile=True)
    assert graphs.capture(2, 1) and graphs.capture(2, 5)
    assert calls == [("compiled", 2, 1), ("eager", 2, 1)] * 3 + [("eager", 2, 5)] * 3
