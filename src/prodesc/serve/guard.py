"""The door of `prodesc serve`: an ASGI middleware that refuses requests before any route reads them.

    app.add_middleware(Guard, svc=svc)

In order: a key-less server bound to loopback answers only loopback `Host` names (421: a DNS-rebinding page
reaches it under its own name); with a key, every path but `/healthz` and `/` needs `Authorization: Bearer KEY`
(401); bodies over the size cap get 413; a key-less server takes only `application/json` bodies (415: the types a
page on another site may POST without a CORS preflight are text/plain and the form types). Every answer, refused
or not, is counted in the metrics by endpoint, status and latency.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import Any

from starlette.exceptions import HTTPException

from prodesc.serve.schemas import ApiError
from prodesc.serve.service import Service

PUBLIC_PATHS = {"/", "/healthz"}
KNOWN_PATHS = PUBLIC_PATHS | {"/metrics", "/v1/models", "/v1/describe", "/v1/chat/completions", "/docs",
                              "/openapi.json"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}
BODYLESS_METHODS = {"GET", "HEAD", "OPTIONS"}


class Guard:
    """ASGI middleware: Host check, API key check, body size cap, JSON-only bodies, per-request metrics."""

    def __init__(self, app: Any, svc: Service) -> None:
        self.app, self.svc = app, svc
        self.max_body = svc.cfg.max_titles * svc.max_title_chars * 6 + 65536  # \uXXXX escapes: 6 bytes
        keyless = svc.api_key is None
        self.hosts = _loopback_names(svc.cfg.host) if keyless and is_loopback(svc.cfg.host) else None
        self.json_only = keyless

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
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if _hostname(host) not in self.hosts:
                return ApiError(421, f"Host {host!r} is not a loopback name: this server has no API key, so it "
                                f"answers only {', '.join(sorted(self.hosts))}; use one, or serve with --api-key",
                                code="host_not_allowed")
        if self.svc.api_key and endpoint not in PUBLIC_PATHS:
            sent = headers.get(b"authorization", b"")
            if not hmac.compare_digest(sent, b"Bearer " + self.svc.api_key.encode()):
                what = "wrong" if sent else "missing"
                return ApiError(401, f"{what} API key: send 'Authorization: Bearer KEY'", "authentication_error",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return ApiError(413, f"request body over {self.max_body} bytes: send fewer or shorter titles")
        if self.json_only and scope["method"] not in BODYLESS_METHODS:
            media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"Content-Type {media or 'missing'!r}: this server has no API key, so it "
                                "takes only 'Content-Type: application/json' bodies (curl: add -H "
                                "'Content-Type: application/json')", code="unsupported_media_type")
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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_names(bind: str) -> set[str]:
    """The Host names a loopback-bound server answers: the usual three, and its own address (e.g. 127.0.0.2)."""
    own = f"[{bind}]" if ":" in bind else bind
    return LOOPBACK_NAMES | {own.lower()}


def _hostname(host: str) -> str:
    """`Host` without its port: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
