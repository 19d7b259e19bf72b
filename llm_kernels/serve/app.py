"""The OpenAI-compatible HTTP front end (FastAPI) over a :class:`~.scheduler.Scheduler`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (server-sent events with
``"stream": true``: ``data: {chunk}`` lines and a last ``data: [DONE]``; one JSON body
otherwise), ``GET /v1/models``, ``GET /health`` (200 while the worker runs, else 503),
``GET /stats`` (the scheduler's counters, used by ``bench-serve``).

Every error is an OpenAI error body (:func:`.protocol.error_body`) naming the field in
``param``: request validation (malformed JSON, wrong types, negative ``max_tokens``, bad
``temperature``, unknown fields) is a 400, not FastAPI's 422; an unknown model name or a
prompt that does not fit ``max_seq_len`` is a 400; a full queue is a 503 with the reason
and ``Retry-After``; an exception in the engine fails only its request (500, or an
``error`` event mid-stream) and the server keeps serving.

The handlers run on the event loop; the scheduler's worker thread hands each step's
events over with one ``loop.call_soon_threadsafe`` into per-request ``asyncio.Queue`` s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .request import Event
from .request import Request as GenRequest
from .scheduler import ContextLengthError, QueueFullError, Scheduler

__all__ = ["create_app", "ServeConfig", "ApiError"]

log = logging.getLogger("llm_kernels.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered as an OpenAI error body with ``status``; ``param`` names the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type_ = status, message, param, code, type_
        self.headers = headers

    def response(self) -> JSONResponse:
        """The error as a JSONResponse (status, OpenAI error body, headers)."""
        return JSONResponse(P.error_body(self.message, self.param, self.type_, self.code), self.status,
                            headers=self.headers)


@dataclass
class ServeConfig:
    """What the app serves: the model's name, the checkpoint folder (its
    ``generation_config.json`` gives the sampling defaults), the scheduler limits, and the
    sampling module (``llm_kernels.text.sampling`` unless given: ``SamplingParams``,
    ``Sampler``, ``StopChecker``)."""

    model_name: str
    checkpoint: Path
    max_batch: int = 8
    max_queue: int = 64
    max_seq_len: int = 4096
    sampling: Any = None
    info: dict = field(default_factory=dict)


class _Server:
    """Per-app state: tokenizer, scheduler, and the request builders."""

    def __init__(self, engine: Any, tokenizer: Any, cfg: ServeConfig):
        if cfg.sampling is None:
            from ..text import sampling as _sampling

            cfg.sampling = _sampling
        self.tok, self.cfg, self.sampling = tokenizer, cfg, cfg.sampling
        self.vocab = int(getattr(engine.cfg, "vocab_size", 0) or 0) or None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.sched = Scheduler(engine, cfg.max_batch, cfg.max_queue, cfg.max_seq_len, deliver=self._deliver)

    # ---------------------------------------------------------------- thread hand-off
    def _deliver(self, events: list[tuple[GenRequest, Event]]) -> None:
        """Worker thread -> event loop: one call per step for all its events."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(_dispatch, events)
            except RuntimeError:  # the loop closed in between (shutdown): nobody is listening
                pass

    # ---------------------------------------------------------------- request building
    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise ApiError(400, f"model: unknown model {name!r}; this server serves {self.cfg.model_name!r} "
                                "(GET /v1/models)", "model", "model_not_found")

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tok.encode(prompt, add_special_tokens=True))
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if self.vocab is not None and not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"prompt: token ids must lie in [0, {self.vocab}), got {bad[:5]}", "prompt")
        if not ids:
            raise ApiError(400, "prompt: the prompt encodes to no tokens", "prompt")
        return ids

    def chat_ids(self, body: P.ChatCompletionRequest) -> list[int]:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                **(body.chat_template_kwargs or {}))
        except Exception as e:  # jinja's TemplateError ("roles must alternate"), a bad kwarg, ...
            raise ApiError(400, f"messages: the chat template failed: {e}", "messages") from None
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if not ids:
            raise ApiError(400, "messages: the conversation encodes to no tokens", "messages")
        return ids

    def make_request(self, body: P._SamplingFields, ids: list[int], max_tokens: int | None,
                     default_max: int | None, prompt_field: str) -> GenRequest:
        """Sampling params (defaults from ``generation_config.json``, the request's fields
        over them), the context check and the per-request sampler/detokenizer/stop state."""
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else self.cfg.max_seq_len - len(ids)
            max_tokens = max(1, min(max_tokens, self.cfg.max_seq_len - len(ids)))
        try:
            self.sched.check_fits(len(ids), max_tokens, prompt_field)
        except ContextLengthError as e:
            raise ApiError(400, str(e), e.param, "context_length_exceeded") from None
        S = self.sampling
        overrides = body.sampling_overrides()
        try:
            params = S.SamplingParams.from_generation_config(self.cfg.checkpoint, max_tokens=max_tokens,
                                                             **overrides)
            params.validate(vocab_size=self.vocab)
        except (ValueError, TypeError) as e:
            msg = str(e).replace("SamplingParams.", "")  # the API's field names are the same
            raise ApiError(400, msg, _param_in(msg, list(overrides) + ["max_tokens"])) from None
        return GenRequest(prompt_ids=ids, params=params, sampler=S.Sampler(params), detok=self.tok.incremental(),
                          stop=S.StopChecker(params, self.tok.eos_token_ids))

    def submit(self, req: GenRequest) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        req.sink = q.put_nowait
        try:
            self.sched.submit(req)
        except QueueFullError as e:
            raise ApiError(503, str(e), None, "server_busy", "server_error", headers={"Retry-After": "1"}) from None
        return q


def _thread_cpu_s(ident: int | None) -> float | None:
    """CPU seconds of thread ``ident`` so far (the event loop's: HTTP parsing, tokenization,
    JSON and SSE encoding), None where the OS cannot tell."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (AttributeError, OSError, TypeError):
        return None


def _dispatch(events: list[tuple[GenRequest, Event]]) -> None:
    for r, ev in events:
        if r.sink is not None:
            r.sink(ev)


def _param_in(message: str, fields: list[str]) -> str | None:
    """The first of ``fields`` the message names (SamplingParams errors name their field)."""
    low = message.lower()
    hits = [(low.find(f), f) for f in fields if f in low]
    return min(hits)[1] if hits else None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Stream(StreamingResponse):
    """An SSE response that cancels its request however the stream ends (finished,
    client gone before or during streaming, server error)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _collect(srv: _Server, req: GenRequest, q: asyncio.Queue, http: Request,
                   poll_s: float = 0.25) -> tuple[str, str]:
    """Wait for a non-streaming request's end; cancel it when the client goes away
    (checked every ``poll_s`` seconds, also while tokens keep arriving)."""
    parts = []
    next_check = time.monotonic() + poll_s
    try:
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), timeout=poll_s)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() >= next_check:
                if await http.is_disconnected():
                    raise ApiError(499, "client disconnected")
                next_check = time.monotonic() + poll_s
            if ev is None:
                continue
            if ev.kind == "error":
                raise ApiError(ev.status, ev.message, None, "engine_error", "server_error")
            parts.append(ev.text)
            if ev.kind == "finish":
                return "".join(parts), ev.finish_reason
    finally:
        srv.sched.cancel(req)  # no-op once finished


def create_app(engine: Any, tokenizer: Any, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``EngineCore`` sized for ``cfg.max_batch``
    sequences of ``cfg.max_seq_len`` tokens) with ``tokenizer``; the scheduler's worker
    starts and stops with the app (lifespan)."""
    srv = _Server(engine, tokenizer, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.loop = asyncio.get_running_loop()
        srv.loop_thread = threading.get_ident()
        srv.sched.start()
        try:
            yield
        finally:
            srv.sched.stop()

    app = FastAPI(title="llm_kernels", lifespan=lifespan)
    app.state.server = srv
    app.state.scheduler = srv.sched

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(P.error_body(str(exc.detail), None), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}: {exc}", None, "server_error"), 500)

    @app.get("/health")
    async def health():
        st = srv.sched.stats()
        ok = st["alive"]
        return JSONResponse({"status": "ok" if ok else "scheduler stopped", "running": st["running"],
                             "waiting": st["waiting"]}, 200 if ok else 503)

    @app.get("/stats")
    async def stats():
        return {**srv.sched.stats(), "http_thread_cpu_s": _thread_cpu_s(srv.loop_thread), **cfg.info}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "llm_kernels", "max_model_len": cfg.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: Request):
        srv.check_model(body.model)
        try:
            prompt = body.single_prompt()
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from None
        ids = srv.prompt_ids(prompt)
        req = srv.make_request(body, ids, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        q = srv.submit(req)
        rid, name = P.new_id("cmpl"), cfg.model_name
        if body.stream:
            return _Stream(_stream_completion(req, q, rid, name, body), lambda: srv.sched.cancel(req))
        text, reason = await _collect(srv, req, q, http)
        return P.completion_response(rid, name, text, reason, P.usage_body(*req.usage()),
                                     list(req.generated) if body.return_token_ids else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, http: Request):
        srv.check_model(body.model)
        ids = srv.chat_ids(body)
        req = srv.make_request(body, ids, body.token_limit(), None, "messages")
        q = srv.submit(req)
        rid, name = P.new_id("chatcmpl"), cfg.model_name
        if body.stream:
            return _Stream(_stream_chat(req, q, rid, name, body), lambda: srv.sched.cancel(req))
        text, reason = await _collect(srv, req, q, http)
        return P.chat_response(rid, name, text, reason, P.usage_body(*req.usage()),
                               list(req.generated) if body.return_token_ids else None)

    return app


async def _events(q: asyncio.Queue) -> AsyncIterator[Event]:
    while True:
        ev = await q.get()
        yield ev
        if ev.kind != "token":
            return


def _stream_error(ev: Event) -> str:
    return _sse(P.error_body(ev.message, None, "server_error", "engine_error")) + "data: [DONE]\n\n"


async def _stream_completion(req: GenRequest, q: asyncio.Queue, rid: str, name: str,
                             body: P.CompletionRequest) -> AsyncIterator[str]:
    created, ids_on = int(time.time()), body.return_token_ids
    async for ev in _events(q):
        if ev.kind == "error":
            yield _stream_error(ev)
            return
        if ev.kind == "token" and not ev.text and not ids_on:
            continue
        yield _sse(P.completion_chunk(rid, name, created, ev.text, ev.finish_reason,
                                      [ev.token_id] if ids_on else None))
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse(P.completion_chunk(rid, name, created, "", usage=P.usage_body(*req.usage()), choices=False))
    yield "data: [DONE]\n\n"


async def _stream_chat(req: GenRequest, q: asyncio.Queue, rid: str, name: str,
                       body: P.ChatCompletionRequest) -> AsyncIterator[str]:
    created, ids_on = int(time.time()), body.return_token_ids
    yield _sse(P.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}))
    async for ev in _events(q):
        if ev.kind == "error":
            yield _stream_error(ev)
            return
        if ev.kind == "token" and not ev.text and not ids_on:
            continue
        delta = {"content": ev.text} if ev.text or ev.kind == "token" else {}
        yield _sse(P.chat_chunk(rid, name, created, delta, ev.finish_reason, [ev.token_id] if ids_on else None))
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse(P.chat_chunk(rid, name, created, {}, usage=P.usage_body(*req.usage()), choices=False))
    yield "data: [DONE]\n\n"


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as an OpenAI 400 naming the field (``param``) of the first error."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    typ, msg = first.get("type", ""), str(first.get("msg", "invalid value"))
    if typ == "json_invalid":
        ctx = first.get("ctx") or {}
        return JSONResponse(P.error_body(f"body: malformed JSON: {ctx.get('error', msg)}", "body"), 400)
    if typ == "missing" and not loc:
        return JSONResponse(P.error_body("body: a JSON object body is required", "body"), 400)
    if typ == "extra_forbidden":
        return JSONResponse(P.error_body(f"{'.'.join(loc)}: unknown field (not supported by this server)",
                                         loc[0] if loc else None), 400)
    if not loc and msg.startswith("Value error, "):  # a model validator: "field: reason"
        msg = msg[len("Value error, "):]
        param = msg.split(":", 1)[0] if ":" in msg else None
        return JSONResponse(P.error_body(msg, param), 400)
    path = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    value = first.get("input")
    got = "" if typ == "missing" else f", got {json.dumps(value, default=str)[:80]}"
    return JSONResponse(P.error_body(f"{path}: {msg}{got}{more}", loc[0] if loc else "body"), 400)
