"""The service behind `prodesc serve`: the generator behind its batcher, the limits, the metrics, the page.

One `Service` per app: routes check and submit requests through it, and it alone calls the model (on the
batcher's thread). The event loop runs no model or CUDA work: a request's neighbour search and prompt (embedding
a title, faiss or a GPU matrix product, tokenizing) run on one prompt thread, `<name>-base` loads and warms up on
another, and each engine is warmed up (`Engine.warm_up`, where the engine has one: its CUDA graphs captured)
before it takes a request: `start()` before the server answers, the base engine before it is registered. A
warm-up that fails is logged and the engine serves without it, never a 500.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from prodesc.config import MIN_SAMPLING_TEMPERATURE, ServeConfig
from prodesc.generate import PHASES, Row
from prodesc.serve.batching import DONE, Batcher, Expired, Job, ModelThreadDead, QueueFull
from prodesc.serve.detok import IncrementalText
from prodesc.serve.schemas import ApiError, Params

log = logging.getLogger(__name__)
MAX_TEMPERATURE = 2.0
WARM_TITLE = "Sony Compact Stereo Headphones - Black"  # any title: the prompt path's first use, before traffic


class Service:
    """Everything a request needs: the generator behind its batcher, the limits, the metrics, the page."""

    def __init__(self, gen: Any, cfg: ServeConfig, api_key: str | None,
                 base: Callable[[], Any] | None = None) -> None:
        """`gen` serves under its name; `base`, if given, loads `<name>-base` on its first request."""
        self.gen, self.cfg, self.api_key, self._load_base = gen, cfg, api_key, base
        self.name = public_name(gen.name)
        # serve.max_title_chars when set, else the cap every verb applies (data.max_title_chars)
        self.max_title_chars = cfg.max_title_chars or gen.cfg.data.max_title_chars
        self.models = {self.name: True, **({f"{self.name}-base": False} if base is not None else {})}
        self.started = int(time.time())
        self.metrics = Metrics()
        self.batcher = Batcher({True: gen.engine(cfg.max_batch_size, cfg.cache_len, cfg.admit_wait_ms / 1000,
                                                 compile=None if cfg.compile else False)},
                               window_s=cfg.batch_window_ms / 1000, queue_size=cfg.queue_size,
                               on_step=self.metrics.step, on_row_end=self.metrics.tokens.inc)
        self.metrics.queue.set_function(lambda: self.batcher.depth)
        for phase in PHASES:
            self.metrics.engine.labels(phase).set_function(lambda p=phase: self._engine_seconds(p))
        self.metrics.registry.register(_PrefillCounts(self.batcher))
        self.metrics.registry.register(_SpeculationCounts(self.batcher))
        self.page = importlib.resources.files("prodesc.serve").joinpath("static/index.html").read_text("utf-8")
        self._base: asyncio.Future | None = None  # the base generator, loading or loaded
        # Neighbour search and prompt building, off the event loop; one thread, so a tokenizer or an embedder is
        # never used by two requests at once.
        self._prompts = ThreadPoolExecutor(1, thread_name_prefix="prodesc-prompts")

    def start(self) -> None:
        """Warm the fine-tuned model up before the server takes traffic (in a thread of the caller's): its engine
        and its prompt path."""
        _warm_up(self.batcher.engines[True], self.name)
        self._warm_prompts(self.gen, self.name)

    def _warm_prompts(self, gen: Any, name: str) -> None:
        """One prompt built on the prompt thread, so the first request does not load the embedder or ready the
        catalog's search (on an H100 before this, a 7B catalog-aware server's first request waited 5.0 s for its
        first token, with the base loading beside it; later ones 0.9 s at p95; not broken down). A failure is
        logged; requests then meet it themselves."""
        t = time.perf_counter()
        try:
            self._prompts.submit(self._build, gen, [WARM_TITLE]).result()
        except Exception as e:  # noqa: BLE001 - the server still starts; a request reports what is wrong
            log.warning("prompt warm-up of %s failed (%s: %s)", name, type(e).__name__, e)
            return
        print(f"{name}: prompt path ready (embedder and catalog search loaded) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self._prompts.shutdown(wait=False, cancel_futures=True)

    def params(self, model: str, max_new_tokens: int | None, temperature: float | None, top_p: float | None,
               tokens_param: str) -> Params:
        """Check the decoding params against the caps; unset ones take the run's `generate:` values. Normalised,
        so the model only ever sees values it can decode with, and equal decodings share a batch: a temperature
        too small to sample is greedy, and greedy decoding ignores top_p."""
        if model not in self.models:
            raise ApiError(404, f"model {model!r} does not exist: use one of {', '.join(self.models)} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        d, cap = self.gen.cfg.generate, self.cfg.max_new_tokens_cap
        tokens = min(d.max_new_tokens, cap) if max_new_tokens is None else max_new_tokens
        if not 1 <= tokens <= cap:
            raise ApiError(400, f"{tokens_param}={tokens}: must be between 1 and {cap} (serve.max_new_tokens_cap)",
                           param=tokens_param)
        temperature = d.temperature if temperature is None else temperature
        if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):  # NaN fails no comparison
            raise ApiError(400, f"temperature={temperature}: must be between 0 (greedy) and {MAX_TEMPERATURE}",
                           param="temperature")
        top_p = d.top_p if top_p is None else top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise ApiError(400, f"top_p={top_p}: must be in (0, 1]", param="top_p")
        if temperature < MIN_SAMPLING_TEMPERATURE:
            temperature, top_p = 0.0, 1.0
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
            if len(title) > self.max_title_chars:
                raise ApiError(400, f"{where} has {len(title)} characters: at most {self.max_title_chars} "
                               "(data.max_title_chars, serve.max_title_chars)", param=param)
        return [t.strip() for t in titles]

    async def submit(self, titles: list[str], params: Params, deadline: float, stream: bool = False) -> Job:
        """Queue the titles as one job (a stream: one title) on the fine-tuned or the base model."""
        gen = self.gen if params.adapter else await self.base()
        near, prompts = await asyncio.get_running_loop().run_in_executor(self._prompts, self._build, gen, titles)
        for title, ids in zip(titles, prompts, strict=True):
            if len(ids) + params.max_new_tokens > self.cfg.cache_len:
                raise ApiError(400, f"a prompt of {len(ids)} tokens + {params.max_new_tokens} new tokens is over "
                               f"serve.cache_len={self.cfg.cache_len}: ask fewer tokens or shorten {title[:40]!r}",
                               param="max_tokens")
        job = Job(titles, params, stream, deadline, asyncio.get_running_loop().create_future())
        job.neighbours, job.prompt_tokens = near, [len(ids) for ids in prompts]
        job.rows = [Row(ids, params.max_new_tokens, params.temperature, params.top_p) for ids in prompts]
        if stream:
            job.pieces = asyncio.Queue()
            def review(tokens: list[int]) -> list[str]:  # the finished answer's review flag
                return self.record(gen, titles[0], tokens, "stop", near[0], 0).get("unsupported", [])

            job.on_token, job.on_done = _stream_sinks(gen.tok, job.pieces, len(prompts[0]), review)
        try:
            return self.batcher.submit(job, params.adapter)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry shortly", "overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ModelThreadDead:
            raise ApiError(503, f"server cannot generate: {self.healthy()}", "server_error",
                           code="model_thread_dead") from None

    def _build(self, gen: Any, titles: list[str]) -> tuple[list[list[dict]], list[list[int]]]:
        """Each title's catalog neighbours and prompt ids (on the prompt thread)."""
        near = gen.neighbours(titles) if hasattr(gen, "neighbours") else [[] for _ in titles]
        return near, [self.prompt(gen, title, nb) for title, nb in zip(titles, near, strict=True)]

    def prompt(self, gen: Any, title: str, near: list[dict] | None = None) -> list[int]:
        """The prompt's token ids: the one seam where a request's prompt is built, with the title's catalog
        neighbours for a run trained with retrieval.k > 0 (looked up when not given)."""
        return gen.prompt_ids(title, near) if near else gen.prompt_ids(title)

    async def base(self) -> Any:
        """The base model's generator, loaded (in a thread, once) on the first request for `<name>-base`: a second
        copy of the base weights, so the fine-tuned model stays merged and never pays for a switchable adapter."""
        if self._base is None:
            self._base = asyncio.ensure_future(asyncio.to_thread(self._load_base_engine))
        try:
            gen, engine = await asyncio.shield(self._base)
        except Exception as e:
            self._base = None  # try again on the next request
            raise ApiError(500, failure(e), "server_error") from None
        self.batcher.engines.setdefault(False, engine)  # registered warm: its first request finds it ready
        return gen

    def _load_base_engine(self) -> tuple[Any, Any]:
        """The base generator and its engine, warmed up (in the loading thread, not on the model thread). Its
        decode steps are captured as CUDA graphs of the eager forward, not compiled: it loads under traffic, and
        compiling holds the interpreter lock for most of a minute (measured on an H100: SmolLM2's compile and
        capture took 57 s, and a stream of the fine-tuned model fell to 4 tokens/s meanwhile); a capture alone
        takes a fraction of a second a graph."""
        gen = self._load_base()
        engine = gen.engine(self.cfg.max_batch_size, self.cfg.cache_len, self.cfg.admit_wait_ms / 1000,
                            compile=False)
        _warm_up(engine, f"{self.name}-base")
        self._warm_prompts(gen, f"{self.name}-base")
        return gen, engine

    async def wait(self, request: Request, job: Job) -> Any:
        """The job's result (a stream: its queue of pieces, once its first token is out); cancels the job
        (skipped, or stopped within a token) when the client leaves or time runs out."""
        future, gone = job.future, asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({future, gone}, timeout=max(job.deadline - time.monotonic(), 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not future.done():
            job.cancel()
            if gone.done() and not gone.cancelled():
                raise ClientGone
            raise self.timeout()
        if isinstance(future.exception(), Expired):
            raise self.timeout()
        if future.exception() is not None:
            raise ApiError(500, failure(future.exception()), "server_error")
        if job.stream:
            return job.pieces
        gen = self.gen if job.params.adapter else await self.base()
        records = [self.record(gen, title, tokens, reason, near, n_prompt) for title, (tokens, reason), near, n_prompt
                   in zip(job.titles, future.result(), job.neighbours, job.prompt_tokens, strict=True)]
        self.metrics.delivered.inc(sum(r["n_tokens"] for r in records))
        return records

    def record(self, gen: Any, title: str, tokens: list[int], reason: str, near: list[dict],
               prompt_tokens: int) -> dict[str, Any]:
        """What `Generator.describe` gives for a title, from the row's tokens (stop tokens counted, not shown)."""
        stops = set(getattr(gen, "stop_ids", None) or [gen.tok.eos_token_id])
        shown = [t for t in tokens if t not in stops]
        rec = {"title": title, "prediction": gen.tok.decode(shown, skip_special_tokens=True).strip(),
               "n_tokens": len(tokens), "stopped_by_eos": reason == "stop", "prompt_tokens": prompt_tokens}
        if hasattr(gen, "review"):  # `unsupported` (the shop's review flag) and the neighbours shown
            return gen.review(rec, near)
        if near:
            rec["neighbours"] = [{k: n[k] for k in ("uid", "title", "score") if k in n} for n in near]
        return rec

    def _engine_seconds(self, phase: str) -> float:
        return sum(getattr(e, "seconds", {}).get(phase, 0.0) for e in list(self.batcher.engines.values()))

    def timeout(self) -> ApiError:
        return ApiError(504, f"no answer within serve.request_timeout_s={self.cfg.request_timeout_s}s: retry, ask "
                        "fewer tokens, or raise the timeout", "timeout")

    def graphs(self) -> dict[str, bool | None]:
        """Per loaded model, whether its decode steps replay CUDA graphs (None: an engine without them)."""
        names = {True: self.name, False: f"{self.name}-base"}
        return {names[k]: getattr(e, "graphs", None) for k, e in list(self.batcher.engines.items())}

    def healthy(self) -> str | None:
        """None, or why the server cannot answer: the model thread died, or is stuck in a call long past its
        deadline."""
        if self.batcher.dead is not None:
            return (f"model thread died ({type(self.batcher.dead).__name__}: {self.batcher.dead}); restart the "
                    "server")
        overdue = self.batcher.overdue()
        if overdue > self.cfg.stuck_after_s:
            return (f"model thread stuck: a generation call is {overdue:.0f}s past its deadline "
                    f"(serve.stuck_after_s={self.cfg.stuck_after_s}); restart the server")
        return None


def _warm_up(engine: Any, name: str) -> None:
    """The engine's warm-up (CUDA graphs captured before any request), where it has one; a failure is logged and
    the engine serves without it (eager decoding answers too, only slower), never a 500."""
    warm_up = getattr(engine, "warm_up", None)
    if warm_up is None:
        return
    try:
        print(f"{name}: {warm_up()}", file=sys.stderr, flush=True)  # start-up's longest part: say what it took
    except Exception as e:  # noqa: BLE001 - serving slower beats not serving
        log.warning("warm-up of %s failed (%s: %s): serving without it", name, type(e).__name__, e)


def _stream_sinks(tok: Any, pieces: asyncio.Queue, prompt_tokens: int,
                  review: Any = None) -> tuple[Any, Any]:
    """A stream's `on_token`/`on_done` (on the event loop): text pieces as tokens decode to whole characters
    (decoding only the new tokens: detok.py), then a dict with the token counts, finish reason and the answer's
    `unsupported` specifics (`review(tokens)`) and DONE; or Expired/an exception; nothing once the client has left."""
    text = IncrementalText(tok)

    def on_token(token: int) -> None:
        piece = text.add(token)
        if piece:
            pieces.put_nowait(piece)

    def on_done(end: Any) -> None:
        if isinstance(end, tuple):
            tokens, reason = end
            piece = text.finish()
            if piece:
                pieces.put_nowait(piece)
            pieces.put_nowait({"n_tokens": len(tokens), "prompt_tokens": prompt_tokens,
                               "finish_reason": "stop" if reason == "stop" else "length",
                               "unsupported": review(tokens) if review else []})
        elif end is not None:
            pieces.put_nowait(end)
            return
        pieces.put_nowait(DONE)

    return on_token, on_done


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
        self.steps = Counter("prodesc_decode_steps", "Model steps (newcomers prefilled, every live row's next token "
                             "launched, the previous step's tokens handed out).", registry=r)
        self.batch = Histogram("prodesc_batch_size", "Rows generating together, per step.", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.tokens = Counter("prodesc_generated_tokens", "New tokens generated.", registry=r)
        self.delivered = Counter("prodesc_delivered_tokens", "New tokens in answers handed over whole (the rest of "
                                 "generated went to clients that left or timed out).", registry=r)
        self.tokens_per_s = Gauge("prodesc_tokens_per_second", "Generated tokens/s of the latest step.", registry=r)
        self.queue = Gauge("prodesc_queue_depth", "Requests waiting for the model.", registry=r)
        self.engine = Gauge("prodesc_engine_seconds", "Model-thread seconds by step phase since start, all models "
                            "(generate/continuous.py PHASES; on CUDA sync is the wait for the device, the other "
                            "phases are host work, done while the device runs the step in flight). Divide by "
                            "prodesc_decode_steps_total for a step's.", ["phase"], registry=r)

    def step(self, tokens: int, seconds: float) -> None:
        """One engine step that handed `tokens` rows a token (on the model thread; the metrics are thread-safe)."""
        self.steps.inc()
        self.batch.observe(tokens)
        self.tokens_per_s.set(tokens / seconds if seconds > 0 else 0.0)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, kind(status)).inc()


class _PrefillCounts:
    """`prodesc_prefills_total` and `prodesc_prefill_rows_total`, read from the engines when /metrics is scraped:
    on a GPU every prefill stalls all live rows for one eager forward, so rows per prefill says how well a burst of
    requests was gathered (serve.admit_wait_ms)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        engines = list(self.batcher.engines.values())
        yield CounterMetricFamily("prodesc_prefills", "Prefills (newcomers joining the running batch in one "
                                  "forward), all models.", value=sum(getattr(e, "prefills", 0) for e in engines))
        yield CounterMetricFamily("prodesc_prefill_rows", "Rows admitted by those prefills.",
                                  value=sum(getattr(e, "prefill_rows", 0) for e in engines))


class _SpeculationCounts:
    """Prompt-lookup speculation (`generate.speculate_tokens`), read from the engines when /metrics is scraped:
    tokens drafted and accepted over every request's rows, and the row-steps that verified drafts; tokens per
    verify step = 1 + accepted / verify row-steps."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        engines = list(self.batcher.engines.values())
        for name, attr, text in (
                ("prodesc_draft_tokens", "drafted", "Tokens drafted by prompt lookup and verified, all requests."),
                ("prodesc_accepted_tokens", "accepted", "Drafted tokens the model agreed with (kept), all requests."),
                ("prodesc_verify_row_steps", "verify_rows", "Rows decoded by verify steps (a row's tokens per verify "
                 "step = 1 + accepted / this).")):
            yield CounterMetricFamily(name, text, value=sum(getattr(e, attr, 0) for e in engines))


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
