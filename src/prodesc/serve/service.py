"""The service behind `prodesc serve`: the generator behind its batcher, the limits, the metrics, the page.

One `Service` per app: routes check and submit requests through it, and it alone calls the model (on the
batcher's thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import inspect
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from prodesc.config import ServeConfig
from prodesc.serve.batching import Batcher, QueueFull
from prodesc.serve.schemas import ApiError, Params

log = logging.getLogger(__name__)
MAX_TEMPERATURE = 2.0


class Service:
    """Everything a request needs: the generator behind its batcher, the limits, the metrics, the page."""

    def __init__(self, gen: Any, cfg: ServeConfig, api_key: str | None) -> None:
        self.gen, self.cfg, self.api_key = gen, cfg, api_key
        self.name = public_name(gen.name)
        has_base = callable(getattr(gen.model, "disable_adapter", None))
        self.models = {self.name: True, **({f"{self.name}-base": False} if has_base else {})}  # name -> adapter
        self.started = int(time.time())
        self.metrics = Metrics()
        self.batcher = Batcher(self._run_batch, self._run_stream, max_batch_size=cfg.max_batch_size,
                               window_s=cfg.batch_window_ms / 1000, queue_size=cfg.queue_size)
        self.metrics.queue.set_function(lambda: self.batcher.depth)
        self.page = importlib.resources.files("prodesc.serve").joinpath("static/index.html").read_text("utf-8")
        self._stream_has_adapter = "adapter" in inspect.signature(gen.stream).parameters

    def params(self, model: str, max_new_tokens: int | None, temperature: float | None, top_p: float | None,
               tokens_param: str) -> Params:
        """Check the decoding params against the caps; unset ones take the run's `generate:` values."""
        if model not in self.models:
            raise ApiError(404, f"model {model!r} does not exist: use one of {', '.join(self.models)} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        d, cap = self.gen.cfg.generate, self.cfg.max_new_tokens_cap
        tokens = min(d.max_new_tokens, cap) if max_new_tokens is None else max_new_tokens
        if not 1 <= tokens <= cap:
            raise ApiError(400, f"{tokens_param}={tokens}: must be between 1 and {cap} (serve.max_new_tokens_cap)",
                           param=tokens_param)
        temperature = d.temperature if temperature is None else temperature
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise ApiError(400, f"temperature={temperature}: must be between 0 (greedy) and {MAX_TEMPERATURE}",
                           param="temperature")
        top_p = d.top_p if top_p is None else top_p
        if not 0 < top_p <= 1:
            raise ApiError(400, f"top_p={top_p}: must be in (0, 1]", param="top_p")
        return Params(self.models[model], tokens, float(temperature), float(top_p))

    def check_titles(self, titles: list[str], param: str = "titles") -> list[str]:
        if not titles:
            raise ApiError(400, f"{param} is empty: send 1 to {self.cfg.max_titles} titles", param=param)
        if len(titles) > self.cfg.max_titles:
            raise ApiError(400, f"{len(titles)} titles: at most {self.cfg.max_titles} per request "
                           "(serve.max_titles); split the request", param=param)
        for i, title in enumerate(titles):
            where = f"{param}[{i}]" if param == "titles" else "the last user message"
            if not title.strip():
                raise ApiError(400, f"{where} is empty: send a product title", param=param)
            if len(title) > self.cfg.max_title_chars:
                raise ApiError(400, f"{where} has {len(title)} characters: at most {self.cfg.max_title_chars} "
                               "(serve.max_title_chars)", param=param)
        return [t.strip() for t in titles]

    def submit(self, titles: list[str], params: Params, stream: bool = False) -> asyncio.Future:
        try:
            return self.batcher.submit(titles, params, stream=stream)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry shortly", "overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from None

    async def wait(self, request: Request, future: asyncio.Future, deadline: float) -> Any:
        """The job's result; cancels the job (so it is skipped) when the client leaves or time runs out."""
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({future, gone}, timeout=max(deadline - time.monotonic(), 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not future.done():
            future.cancel()
            if gone.done() and not gone.cancelled():
                raise ClientGone
            raise ApiError(504, f"no answer within serve.request_timeout_s={self.cfg.request_timeout_s}s: "
                           "retry, ask fewer tokens, or raise the timeout", "timeout")
        if future.exception() is not None:
            raise ApiError(500, failure(future.exception()), "server_error")
        return future.result()

    def _run_batch(self, titles: list[str], p: Params) -> list[dict[str, Any]]:
        """On the model thread: one `describe` call for the whole batch."""
        t0 = time.perf_counter()
        records = self.gen.describe(titles, self._decoding(p, len(titles)), adapter=p.adapter)
        self.metrics.generated(len(titles), self.cfg.max_batch_size, sum(r["n_tokens"] for r in records),
                               time.perf_counter() - t0)
        for rec in records:
            rec["prompt_tokens"] = self._prompt_tokens(rec["title"])
        return records

    def _run_stream(self, title: str, p: Params, emit: Any) -> None:
        """On the model thread: push text pieces, then a dict with the token counts and finish reason."""
        t0, text = time.perf_counter(), []
        kwargs = {"adapter": p.adapter} if self._stream_has_adapter else {}
        off = self.gen.model.disable_adapter() if not p.adapter and not kwargs else contextlib.nullcontext()
        with off:
            for piece in self.gen.stream(title, self._decoding(p, 1), **kwargs):
                if piece:
                    text.append(piece)
                    emit(piece)
        n = min(self._count_tokens("".join(text)), p.max_new_tokens)  # re-tokenized text: an estimate
        self.metrics.generated(1, 1, n, time.perf_counter() - t0)
        emit({"n_tokens": n, "prompt_tokens": self._prompt_tokens(title),
              "finish_reason": "length" if n >= p.max_new_tokens else "stop"})

    def _decoding(self, p: Params, n: int) -> Any:
        return self.gen.cfg.generate.model_copy(update={
            "max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
            "batch_size": min(max(n, 1), self.cfg.max_batch_size)})

    def _prompt_tokens(self, title: str) -> int:
        if hasattr(self.gen, "prompt_ids"):  # a Generator: its prompt holds the catalog neighbours too
            return len(self.gen.prompt_ids(title))
        tok = getattr(self.gen, "tok", None)
        if tok is None:
            return 0
        from prodesc import prompts

        return len(prompts.prompt_ids(tok, title, self.gen.cfg.prompt))

    def _count_tokens(self, text: str) -> int:
        tok = getattr(self.gen, "tok", None)
        return len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else len(text.split())


class Metrics:
    """Prometheus metrics in a registry of their own, so several apps can live in one process (tests)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("prodesc_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("prodesc_errors", "Error answers by endpoint and kind.", ["endpoint", "kind"],
                              registry=r)
        self.latency = Histogram("prodesc_request_latency_seconds", "Request latency (streams: until the end).",
                                 ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.calls = Counter("prodesc_generation_calls", "Model generate() calls (a batch of titles each).",
                             registry=r)
        self.batch = Histogram("prodesc_batch_size", "Titles per generation call.", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.tokens = Counter("prodesc_generated_tokens", "New tokens generated.", registry=r)
        self.tokens_per_s = Gauge("prodesc_tokens_per_second", "Generated tokens/s of the latest call.", registry=r)
        self.queue = Gauge("prodesc_queue_depth", "Requests waiting for the model.", registry=r)

    def generated(self, n_titles: int, batch_size: int, tokens: int, seconds: float) -> None:
        """`describe` splits `n_titles` into calls of `batch_size`: count each call and its size."""
        for start in range(0, n_titles, batch_size):
            self.calls.inc()
            self.batch.observe(min(batch_size, n_titles - start))
        self.tokens.inc(tokens)
        self.tokens_per_s.set(tokens / seconds if seconds > 0 else 0.0)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, kind(status)).inc()


class ClientGone(Exception):
    """The client disconnected before its answer: nobody to answer."""


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def failure(exc: BaseException) -> str:
    log.error("generation failed", exc_info=exc)
    return f"generation failed: {type(exc).__name__}: {exc}"


def kind(status: int) -> str:
    kinds = {401: "auth", 499: "client_closed", 503: "overloaded", 504: "timeout"}
    return kinds.get(status, "invalid_request" if status < 500 else "server_error")


def public_name(name: str) -> str:
    """A local dir serves under its folder name; Hub ids and embedded names stay as they are."""
    return Path(name).resolve().name if Path(name).is_dir() else name
