"""Chat templates rendered with jinja2 the way transformers renders them.

transformers (``utils/chat_template_utils.py``, 5.x) compiles a template in an
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML
(``json.dumps(x, ensure_ascii=False, ...)``), the globals ``raise_exception`` and
``strftime_now``, and renders it with ``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the tokenizer's named special tokens (``bos_token``,
``eos_token``, ...) and the caller's keyword arguments (e.g. Qwen3's ``enable_thinking``).
Message keys whose value is None are dropped first, and a message's reasoning given as
``thinking`` / ``reasoning`` is also passed as ``reasoning_content``. This module does the
same (without transformers' ``{% generation %}`` assistant masks).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

__all__ = ["render_chat_template", "compile_template"]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """``{% generation %} ... {% endgeneration %}`` renders its body (transformers tracks
    assistant spans with it; we only need the text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled jinja2 template (cached per text). Raises TokenizerError on a syntax error."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat_template: jinja syntax error at line {e.lineno}: {e.message}") from None


def _normalize(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role'")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         special_tokens: dict[str, str] | None = None, tools: list[dict] | None = None,
                         documents: list[dict] | None = None, **template_kwargs: Any) -> str:
    """Render ``template`` over ``messages`` (list of ``{"role", "content", ...}`` dicts).

    ``special_tokens`` (``{"bos_token": "...", ...}``) are visible to the template;
    ``template_kwargs`` override them. Raises TypeError/ValueError for malformed messages and
    TokenizerError when the template raises (``raise_exception``) or fails to render."""
    msgs = _normalize(messages)
    kwargs = {**(special_tokens or {}), **template_kwargs}
    try:
        return compile_template(template).render(messages=msgs, tools=tools, documents=documents,
                                                 add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat_template: {e}") from None
