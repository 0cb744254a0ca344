"""The OpenAI chat-completions request body (the part mmhub serves) and OpenAI-style errors.

Unknown fields are ignored, as OpenAI's own server and vLLM do, except those that would change the answer in a
way mmhub cannot honour (``tools``, ``logprobs``, ``response_format`` other than text): those are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP `status`."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.kind, self.param, self.code = message, status, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        return stops

    def refused(self) -> APIError | None:
        """A field mmhub cannot honour, as an error naming it."""
        extra = self.model_extra or {}
        for name in ("tools", "functions", "tool_choice", "logprobs", "top_logprobs"):
            if extra.get(name) not in (None, False, [], "none"):
                return APIError(f"'{name}' is not supported by this server; leave it out", param=name)
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            return APIError(f"response_format {fmt.get('type')!r} is not supported; only text", param="response_format")
        return None

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's first error as an OpenAI-style 400 naming the field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid body"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param)
