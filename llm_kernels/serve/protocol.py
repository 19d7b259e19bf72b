"""OpenAI-compatible request and response bodies of the server (pydantic models), and the
error body every 4xx/5xx answer carries.

Requests follow the OpenAI API (``/v1/completions``, ``/v1/chat/completions``) with the
sampling extras vLLM accepts (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``, ``chat_template_kwargs``, ``return_token_ids``). Unknown fields are
rejected (a misspelt ``max_token`` is a 400 naming it, not silently ignored); fields of the
OpenAI API that this server does not implement are accepted only at their neutral value
(``n=1``, ``logprobs`` off, ``echo`` off, no tools) and otherwise rejected naming the field.

Error body (what the ``openai`` client parses): ``{"error": {"message", "type", "param",
"code"}}``; ``param`` names the offending field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "error_body",
           "completion_response", "completion_chunk", "chat_response", "chat_chunk", "usage_body", "new_id"]


def error_body(message: str, param: str | None = None, type_: str = "invalid_request_error",
               code: str | None = None) -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    """A fresh response id such as ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage counts."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints (OpenAI names; vLLM's extras)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    user: str | None = None
    return_token_ids: bool = False

    def stop_list(self) -> list[str]:
        """``stop`` as a list of strings."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_overrides(self) -> dict[str, Any]:
        """The sampling fields the request sets, by ``SamplingParams`` field name (fields left
        unset keep the server's defaults from ``generation_config.json``)."""
        out: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "seed"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if self.stop is not None:
            out["stop"] = self.stop_list()
        if self.stop_token_ids is not None:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            out["ignore_eos"] = True
        return out

    @model_validator(mode="after")
    def _check_stop(self):
        stops = self.stop_list()
        if any(s == "" for s in stops):
            raise ValueError("stop: stop strings must be non-empty")
        if len(stops) > 16:
            raise ValueError(f"stop: at most 16 stop strings, got {len(stops)}")
        return self


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, or token ids, or a list holding one of
    them (one prompt per request)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt (text or ids); ValueError naming ``prompt`` for a batch or an empty one."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(f"prompt: one prompt per request is supported, got {len(p)}")
            p = p[0]
        if len(p) == 0:
            raise ValueError("prompt: must not be empty")
        return p


class ChatMessage(BaseModel):
    """One chat message. ``content`` may be a string or a list of ``{"type": "text", "text"}``
    parts (the parts are joined)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as one string; ValueError naming the field for a non-text part."""
        c = self.content
        if c is None:
            return ""
        if isinstance(c, str):
            return c
        out = []
        for part in c:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages.content: only text parts are supported, got type {part.get('type')!r}")
            out.append(part["text"])
        return "".join(out)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    logprobs: Literal[False] | None = None
    tools: list[Any] | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_format(self):
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------- responses
def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI ``usage``: prompt, completion and total token counts."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _body(rid: str, obj: str, model: str, created: int, choice: dict | None, token_ids: list[int] | None,
          usage: dict | None) -> dict:
    """An OpenAI response/chunk body with at most one choice (``token_ids``, vLLM's
    extension, is added to it when given; ``choice=None``: a usage-only chunk)."""
    body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": []}
    if choice is not None:
        choice = {"index": 0, **choice}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body["choices"] = [choice]
    if usage is not None:
        body["usage"] = usage
    return body


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, usage: dict,
                        token_ids: list[int] | None = None) -> dict:
    """A non-streaming ``text_completion`` body."""
    return _body(rid, "text_completion", model, int(time.time()),
                 {"text": text, "logprobs": None, "finish_reason": finish_reason}, token_ids, usage)


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     token_ids: list[int] | None = None, usage: dict | None = None,
                     choices: bool = True) -> dict:
    """One streamed ``text_completion`` chunk (``choices=False``: the usage-only last chunk)."""
    choice = {"text": text, "logprobs": None, "finish_reason": finish_reason} if choices else None
    return _body(rid, "text_completion", model, created, choice, token_ids, usage)


def chat_response(rid: str, model: str, text: str, finish_reason: str | None, usage: dict,
                  token_ids: list[int] | None = None) -> dict:
    """A non-streaming ``chat.completion`` body."""
    choice = {"message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
    return _body(rid, "chat.completion", model, int(time.time()), choice, token_ids, usage)


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               token_ids: list[int] | None = None, usage: dict | None = None, choices: bool = True) -> dict:
    """One streamed ``chat.completion.chunk`` (``choices=False``: the usage-only last chunk)."""
    choice = {"delta": delta, "logprobs": None, "finish_reason": finish_reason} if choices else None
    return _body(rid, "chat.completion.chunk", model, created, choice, token_ids, usage)
