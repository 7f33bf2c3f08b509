"""Request bodies of `prodesc serve`, its OpenAI-style error, and the decoding params a request resolves to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class DescribeRequest(BaseModel):
    """`POST /v1/describe`. Unset decoding params take the run's `generate:` settings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    titles: list[str] = Field(description="Product titles, one description each (order kept).")
    max_new_tokens: int | None = Field(None, description="New tokens at most per description.")
    temperature: float | None = Field(None, description="0 = greedy; at most 2.")
    top_p: float | None = Field(None, description="Nucleus sampling, in (0, 1].")
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
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream_options: dict[str, Any] | None = None


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
