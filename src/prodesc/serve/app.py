"""`prodesc serve`: an OpenAI-compatible API, /v1/describe, /metrics and a page to try the model.

    prodesc serve --run runs/smol                                   # http://127.0.0.1:8000/
    prodesc serve --run runs/smol --api-key "$KEY" --host 0.0.0.0 --set serve.max_batch_size=64
    curl -s localhost:8000/v1/describe -H 'Content-Type: application/json' -d '{"titles": ["Red Mug"]}'

Endpoints: `POST /v1/describe`, `POST /v1/chat/completions` (plain or `stream: true` server-sent events),
`GET /v1/models`, `GET /healthz`, `GET /metrics` (Prometheus) and `GET /` (the page). A run serves two models:
its own name (the fine-tuned adapter) and `<name>-base` (the same weights with the adapter off).

Requests that arrive within `serve.batch_window_ms` with the same decoding params share one generation call
(batcher.py); one thread owns the model. Streaming answers run one at a time on that thread, between batches.
A full queue answers 503 with Retry-After, a slow answer 504, bad input 400 with an OpenAI-style error body.
With `--api-key` (or $PRODESC_API_KEY) every path but `/healthz` and `/` needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from prodesc import config as configmod
from prodesc.config import ServeConfig
from prodesc.errors import ProdescError
from prodesc.serve.batching import DONE
from prodesc.serve.schemas import ApiError, ChatMessage, ChatRequest, DescribeRequest
from prodesc.serve.service import ClientGone, Service, failure, kind

log = logging.getLogger(__name__)
PUBLIC_PATHS = {"/", "/healthz"}
KNOWN_PATHS = PUBLIC_PATHS | {"/metrics", "/v1/models", "/v1/describe", "/v1/chat/completions", "/docs",
                              "/openapi.json"}


def serve_cli(run: Path | None, model: str | None, api_key: str | None, config: Path | None,
              overrides: list[str]) -> None:
    """The `prodesc serve` verb: check the settings and the port, load the model once, run uvicorn."""
    import uvicorn

    from prodesc.generate import Generator

    if (run is None) == (model is None):
        raise ProdescError("pass exactly one of --run RUN_DIR or --model MODEL_OR_MERGED_DIR")
    if config is not None:
        overrides = [*_section_overrides(configmod.load(config)), *overrides]
    run_config = run / "config.yaml" if run is not None and (run / "config.yaml").exists() else None
    early = configmod.load(run_config, overrides).serve  # every --set checked before the model loads
    _check_port(early.host, early.port)
    # Unmerged on purpose: `<name>-base` needs the adapter switchable. For throughput, see vLLM in the README.
    gen = Generator.from_run(run, overrides, merge=False) if run else Generator.from_model(model, None, overrides)
    cfg, api_key = gen.cfg.serve, api_key or None
    if api_key is None and not _is_loopback(cfg.host):
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    app = create_app(gen, cfg, api_key)
    names = ", ".join(_svc_of(app).models)
    print(f"serving {names} on http://{cfg.host}:{cfg.port}/  (API: /v1, metrics: /metrics)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=5)


def create_app(generator: Any, cfg: ServeConfig, api_key: str | None = None) -> FastAPI:
    """The ASGI app around a loaded `Generator` (or anything with `name`, `model`, `cfg`, `describe`, `stream`)."""
    svc = Service(generator, cfg, api_key or None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await svc.batcher.close()

    app = FastAPI(title="prodesc", summary="Product descriptions from titles.", lifespan=lifespan)
    app.state.prodesc = svc
    app.add_middleware(_Guard, svc=svc)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)  # a bug: JSON 500, logged, the server keeps running
    app.include_router(router)
    return app


# ---- routes ----------------------------------------------------------------------------------------------------

router = APIRouter()


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """Request schema for /docs (bodies are parsed by `_parse`); defined here for the decorators below."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(_svc(request).page)


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    return {"status": "ok", "models": list(svc.models), "queued": svc.batcher.depth}


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
    records = await svc.wait(request, svc.submit(titles, params), deadline)
    keep = ("neighbours",)  # the catalog items in the prompt, for runs trained with retrieval.k > 0
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
    title = svc.check_titles([_last_user_text(body.messages)], param="messages")[0]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream:
        pieces = await svc.wait(request, svc.submit([title], params, stream=True), deadline)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(svc, pieces, head, deadline, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    [rec] = await svc.wait(request, svc.submit([title], params), deadline)
    choice = {"index": 0, "message": {"role": "assistant", "content": rec["prediction"]},
              "finish_reason": "stop" if rec["stopped_by_eos"] else "length"}
    prompt = rec.get("prompt_tokens", 0)
    usage = {"prompt_tokens": prompt, "completion_tokens": rec["n_tokens"], "total_tokens": prompt + rec["n_tokens"]}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}


async def _sse(svc: Service, pieces: asyncio.Queue, head: dict[str, Any], deadline: float,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunks: a role delta, one content delta per piece, a finish chunk, (usage), then [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    info: dict[str, Any] = {}
    while True:
        try:
            item = await asyncio.wait_for(pieces.get(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            item = ApiError(504, "stream exceeded serve.request_timeout_s; raise it or ask fewer tokens", "timeout")
        if item is DONE:
            break
        if isinstance(item, Exception):
            err = item if isinstance(item, ApiError) else ApiError(500, failure(item), "server_error")
            svc.metrics.errors.labels("/v1/chat/completions", kind(err.status)).inc()
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
            break
        if isinstance(item, dict):
            info = item
        else:
            yield chunk({"content": item})
    if info:
        yield chunk({}, info["finish_reason"])
    if info and include_usage:
        usage = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["n_tokens"],
                 "total_tokens": info["prompt_tokens"] + info["n_tokens"]}
        yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


class _Guard:
    """ASGI middleware: API key check, body size cap, per-request metrics (endpoint, status, latency)."""

    def __init__(self, app: Any, svc: Service) -> None:
        self.app, self.svc = app, svc
        self.max_body = svc.cfg.max_titles * svc.cfg.max_title_chars * 6 + 65536  # \uXXXX escapes: 6 bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status, t0 = 500, time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self._refuse(scope, endpoint)
            if error is not None:
                return await error.response()(scope, receive, send_status)
            await self.app(scope, self._capped(receive), send_status)
        finally:
            self.svc.metrics.request(endpoint, status, time.perf_counter() - t0)

    def _refuse(self, scope: dict, endpoint: str) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.svc.api_key and endpoint not in PUBLIC_PATHS:
            sent = headers.get(b"authorization", b"")
            if not hmac.compare_digest(sent, b"Bearer " + self.svc.api_key.encode()):
                what = "wrong" if sent else "missing"
                return ApiError(401, f"{what} API key: send 'Authorization: Bearer KEY'", "authentication_error",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return ApiError(413, f"request body over {self.max_body} bytes: send fewer or shorter titles")
        return None

    def _capped(self, receive: Any) -> Any:
        """A receive that stops chunked bodies (no Content-Length) at the same cap."""
        seen = 0

        async def capped() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, f"request body over {self.max_body} bytes: send fewer or shorter titles")
            return message

        return capped


# ---- helpers ---------------------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it, /metrics counts it


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error").response()


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`: JSON whatever the Content-Type (curl -d sends a form type), every problem listed."""
    try:
        data = json.loads(await request.body())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"request body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body is a JSON {type(data).__name__}: send a JSON object")
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


def _section_overrides(cfg: configmod.ProdescConfig) -> list[str]:
    return [f"{section}.{key}={json.dumps(value)}" for section in ("serve", "generate")
            for key, value in getattr(cfg, section).model_dump().items()]


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ProdescError(f"cannot listen on {host}:{port}: {e.strerror}: pass another --port or --host") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
