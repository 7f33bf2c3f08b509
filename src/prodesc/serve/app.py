"""`prodesc serve`: an OpenAI-compatible API, /v1/describe, /metrics and a page to try the model.

    prodesc serve --run runs/smol                                   # http://127.0.0.1:8000/
    prodesc serve --run runs/smol --api-key "$KEY" --host 0.0.0.0 --set serve.max_batch_size=64
    curl -s localhost:8000/v1/describe -H 'Content-Type: application/json' -d '{"titles": ["Red Mug"]}'

Endpoints: `POST /v1/describe`, `POST /v1/chat/completions` (plain or `stream: true` server-sent events),
`GET /v1/models`, `GET /healthz`, `GET /metrics` (Prometheus) and `GET /` (the page). A run serves two models:
its own name (the fine-tuned model, merged) and `<name>-base` (a second copy of the base weights, loaded on its
first request).

Every request joins one running batch (continuous batching, batching.py and generate/continuous.py): streams and
plain answers with any decoding settings share each step, joining and leaving token by token; one thread owns
the models.
A full queue answers 503 with Retry-After, a slow answer 504, bad input 400 with an OpenAI-style error body.
Every generation stops within a token once its client leaves or its deadline passes (batching.py), and
`/healthz` answers 503 when the model thread is stuck. With `--api-key` (or $PRODESC_API_KEY) every path but
`/healthz` and `/` needs `Authorization: Bearer KEY`; without one, guard.py keeps other sites' pages out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from prodesc import rundir
from prodesc.config import ServeConfig
from prodesc.errors import ProdescError
from prodesc.serve.batching import DONE, Expired, Job
from prodesc.serve.guard import Guard, is_loopback
from prodesc.serve.schemas import ApiError, ChatMessage, ChatRequest, DescribeRequest, read_json
from prodesc.serve.service import ClientGone, Service, failure, kind

log = logging.getLogger(__name__)


def serve_cli(run: Path | None, model: str | None, api_key: str | None, config: Path | None = None,
              flags: dict[str, Any] | None = None, sets: list[str] | None = None) -> None:
    """The `prodesc serve` verb: check the settings and the port, load the model once, run uvicorn."""
    import uvicorn

    from prodesc.generate import Generator

    if (run is None) == (model is None):
        raise ProdescError("pass exactly one of --run RUN_DIR or --model MODEL_OR_MERGED_DIR")
    if api_key is None and os.environ.get("PRODESC_API_KEY") is not None:
        api_key = os.environ["PRODESC_API_KEY"]  # typer reads an empty variable as unset: that would be no auth
    check_api_key(api_key)
    settings = rundir.settings(run, config, {**(flags or {}), **({"model.name": model} if model else {})}, sets)
    check_cors(settings.serve, api_key)
    if settings.generate.grounded != "off":  # served answers must be the evaluated ones: refuse, never ignore
        raise ProdescError(f"generate.grounded={settings.generate.grounded}, serve: the serving engine does not hold "
                           "back specifics yet (prodesc generate does): set --set generate.grounded=off; every answer "
                           "still lists its `unsupported` specifics")
    _check_port(settings.serve.host, settings.serve.port)  # every setting and the port checked before the model loads
    # Merged: the fine-tuned model runs at base speed; `<name>-base` is a second copy, loaded on first request.
    gen = Generator.from_run(run, settings, merge=True) if run else Generator.from_model(model, None, settings)
    base = (lambda: Generator.base_of_run(run, settings)) if run else None
    cfg = settings.serve
    if api_key is None and not is_loopback(cfg.host):
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    app = create_app(gen, cfg, api_key, base=base)
    names = ", ".join(_svc_of(app).models)
    print(f"serving {names} on http://{cfg.host}:{cfg.port}/  (API: /v1, metrics: /metrics)", flush=True)
    # The model thread waits for the GPU with the GIL released; taking it back while the event loop runs Python
    # (SSE for every stream) takes up to the switch interval: 5 ms by default, half an H200 decode step at batch 64.
    sys.setswitchinterval(0.001)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)


def create_app(generator: Any, cfg: ServeConfig, api_key: str | None = None,
               base: Callable[[], Any] | None = None) -> FastAPI:
    """The ASGI app around a loaded `Generator` (or anything with `name`, `cfg`, `tok`, `prompt_ids`, `engine`);
    `base()` loads the `<name>-base` generator on its first request (None: no base model)."""
    check_api_key(api_key)
    check_cors(cfg, api_key)
    svc = Service(generator, cfg, api_key, base)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(svc.start)  # the engine warmed up (CUDA graphs) before the first request
        yield
        await svc.batcher.close()
        svc.close()

    app = FastAPI(title="prodesc", summary="Product descriptions from titles.", lifespan=lifespan)
    app.state.prodesc = svc
    app.add_middleware(Guard, svc=svc)
    if cfg.cors_origins:  # added last, so outermost: preflights are answered before the Guard asks for a key
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)  # a bug: JSON 500, logged, the server keeps running
    app.include_router(router)
    return app


def check_api_key(api_key: str | None) -> None:
    """None serves without auth; an empty or blank key would too, by accident: refuse it."""
    if api_key is not None and not api_key.strip():
        raise ProdescError("empty API key from --api-key or $PRODESC_API_KEY, serve: pass a non-empty key, or "
                           "unset PRODESC_API_KEY and drop --api-key to serve without auth")


def check_cors(cfg: ServeConfig, api_key: str | None) -> None:
    """`serve.cors_origins: ["*"]` lets any site's page call the server from its visitors' browsers: with no key,
    that is anyone's model (and a way past the loopback guard); refuse it."""
    if "*" in cfg.cors_origins and api_key is None:
        raise ProdescError("serve.cors_origins=['*'] without --api-key lets every website's pages use this model: "
                           "list the origins that may (e.g. https://shop.example), or set --api-key")


# ---- routes ----------------------------------------------------------------------------------------------------

router = APIRouter()


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """Request schema for /docs (bodies are parsed by `_parse`); defined here for the decorators below."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(_svc(request).page)


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    svc = _svc(request)
    problem = svc.healthy()
    body = {"status": ("dead" if svc.batcher.dead is not None else "stuck") if problem else "ok",
            "models": list(svc.models), "queued": svc.batcher.depth, "graphs": svc.graphs()}
    return JSONResponse({**body, "detail": problem} if problem else body, status_code=503 if problem else 200)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_svc(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    data = [{"id": name, "object": "model", "created": svc.started, "owned_by": "prodesc"} for name in svc.models]
    return {"object": "list", "data": data}


@router.post("/v1/describe", openapi_extra=_json_body(DescribeRequest))
async def describe(request: Request) -> dict[str, Any]:
    svc, body = _svc(request), await _parse(request, DescribeRequest)
    deadline = time.monotonic() + svc.cfg.request_timeout_s
    name = body.model or svc.name
    params = svc.params(name, body.max_new_tokens, body.temperature, body.top_p, "max_new_tokens")
    titles = svc.check_titles(body.titles)
    records = await svc.wait(request, await svc.submit(titles, params, deadline))
    # unsupported: specifics stated neither in the title nor in the neighbours shown (check before publishing);
    # neighbours: the catalog items in the prompt, for runs trained with retrieval.k > 0
    keep = ("unsupported", "neighbours")
    return {"descriptions": [{"title": r["title"], "description": r["prediction"], "n_tokens": r["n_tokens"],
                              "stopped_by_eos": r["stopped_by_eos"], **{k: r[k] for k in keep if k in r}}
                             for r in records], "model": name}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
    svc, body = _svc(request), await _parse(request, ChatRequest)
    deadline = time.monotonic() + svc.cfg.request_timeout_s
    tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = svc.params(body.model, tokens, body.temperature, body.top_p, "max_tokens")
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: only n=1 is supported; send several requests", param="n")
    if body.stop:  # ignored, it would give answers longer than the caller asked for
        raise ApiError(400, "stop sequences are not supported: answers end at the model's end token or max_tokens; "
                       "drop `stop` and cut the text yourself", param="stop")
    title = svc.check_titles([_last_user_text(body.messages)], param="messages")[0]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream:
        job = await svc.submit([title], params, deadline, stream=True)
        pieces = await svc.wait(request, job)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return _JobStream(job, _sse(svc, pieces, head, deadline, usage), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    [rec] = await svc.wait(request, await svc.submit([title], params, deadline))
    choice = {"index": 0, "message": {"role": "assistant", "content": rec["prediction"]},
              "finish_reason": "stop" if rec["stopped_by_eos"] else "length"}
    prompt = rec.get("prompt_tokens", 0)
    usage = {"prompt_tokens": prompt, "completion_tokens": rec["n_tokens"], "total_tokens": prompt + rec["n_tokens"]}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage,
            "unsupported": rec.get("unsupported", [])}  # prodesc's review flag: specifics no prompt text states


class _JobStream(StreamingResponse):
    """A streamed answer that cancels its job however it ends (done, timed out, or cut off when starlette sees
    the client leave, possibly while a send is blocked), so the generation stops within a token."""

    def __init__(self, job: Job, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _sse(svc: Service, pieces: asyncio.Queue, head: dict[str, Any], deadline: float,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunks: a role delta, content deltas (one per piece, or all the pieces pending when the client fell
    behind), a finish chunk, (usage), then [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    info: dict[str, Any] = {}
    while True:
        items = []
        if pieces.empty():  # else no wait_for (a task and a timer each call on Python 3.11)
            try:
                items.append(await asyncio.wait_for(pieces.get(), max(deadline - time.monotonic(), 0.0)))
            except TimeoutError:
                items.append(Expired())
        while not pieces.empty():  # a client that fell behind gets what is pending as one event
            items.append(pieces.get_nowait())
        text = "".join(item for item in items if isinstance(item, str))
        if text:
            yield chunk({"content": text})
        end = next((item for item in items if item is DONE or isinstance(item, Exception)), None)
        info = next((item for item in items if isinstance(item, dict)), info)
        if isinstance(end, Exception):
            err = svc.timeout() if isinstance(end, Expired) else ApiError(500, failure(end), "server_error")
            svc.metrics.errors.labels("/v1/chat/completions", kind(err.status)).inc()
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
        if end is not None:
            break
    if info:
        svc.metrics.delivered.inc(info["n_tokens"])
        yield chunk({}, info["finish_reason"], unsupported=info.get("unsupported", []))  # prodesc's review flag
    if info and include_usage:
        usage = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["n_tokens"],
                 "total_tokens": info["prompt_tokens"] + info["n_tokens"]}
        yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


# ---- helpers ---------------------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it, /metrics counts it


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error").response()


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`, every problem listed (the Guard has checked its size and, key-less, its type)."""
    data = read_json(await request.body())
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, _problems(e.errors()), param=_param(e.errors())) from None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return ApiError(400, _problems(exc.errors()), param=_param(exc.errors())).response()


def _problems(errors: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
                     for err in errors)


def _param(errors: Any) -> str | None:
    loc = [p for p in errors[0]["loc"] if p != "body"] if errors else []
    return str(loc[0]) if loc else None


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} {request.url.path}: method not allowed; use {allowed}"
    return ApiError(exc.status_code, message, kind, headers=exc.headers).response()


def _svc(request: Request) -> Service:
    return request.app.state.prodesc


def _svc_of(app: FastAPI) -> Service:
    return app.state.prodesc


def _last_user_text(messages: list[ChatMessage]) -> str:
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages has no user message: send [{'role': 'user', 'content': TITLE}]",
                       param="messages")
    content = users[-1].content
    if isinstance(content, list):
        return "".join(part.text or "" for part in content if part.type == "text")
    return content or ""


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ProdescError(f"cannot listen on {host}:{port}: {e.strerror}: pass another --port or --host") from None
