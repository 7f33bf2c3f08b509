"""Request bodies of `prodesc serve` (read safely, then validated), its OpenAI-style error, and the decoding
params a request resolves to."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class DescribeRequest(BaseModel):
    """`POST /v1/describe`. Unset decoding params take the run's `generate:` settings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    titles: list[str] = Field(description="Product titles, one description each (order kept).")
    max_new_tokens: int | None = Field(None, description="New tokens at most per description.")
    temperature: float | None = Field(None, allow_inf_nan=False, description="0 = greedy; at most 2.")
    top_p: float | None = Field(None, allow_inf_nan=False, description="Nucleus sampling, in (0, 1].")
    model: str | None = Field(None, description="A name from /v1/models (default: the fine-tuned model).")


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`: the last user message is the title. Other OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, allow_inf_nan=False)
    top_p: float | None = Field(None, allow_inf_nan=False)
    n: int = 1
    stop: str | list[str] | None = None  # refused when set (app.chat_completions): never silently ignored
    stream_options: dict[str, Any] | None = None


MAX_JSON_DEPTH = 32  # the deepest request (chat content parts) nests 5 levels


def read_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 for anything a parser or validator could choke on: invalid JSON or
    UTF-8, NaN/Infinity (not JSON), nesting deeper than MAX_JSON_DEPTH (Python's parser raises RecursionError
    near 1000 levels), and lone UTF-16 surrogates ("\\ud800": valid JSON, but no tokenizer or UTF-8 encoder
    takes them)."""
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels: send a flat JSON object") \
            from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"request body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body is a JSON {type(data).__name__}: send a JSON object")
    _check_tree(data)
    return data


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number; send a finite number")


def _check_tree(data: Any) -> None:
    """Walk the parsed body without recursion: depth and lone surrogates."""
    todo = [(data, 1)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels: send a flat JSON object")
        if isinstance(node, dict):
            todo += [(k, depth) for k in node] + [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            todo += [(v, depth + 1) for v in node]
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"request body holds a lone surrogate ({node!r}): send valid Unicode text "
                               "(a \\ud800-\\udbff escape must be followed by \\udc00-\\udfff)") from None


class ApiError(Exception):
    """An answer with an OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Params:
    """Decoding params of a request; only requests with equal params share a generation call."""

    adapter: bool
    max_new_tokens: int
    temperature: float
    top_p: float
