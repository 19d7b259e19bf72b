"""A Hugging Face tokenizer directory read with the ``tokenizers`` library.

:class:`Tokenizer` reads

* ``tokenizer.json`` (required): the fast tokenizer (model, pre-tokenizer, post-processor,
  decoder, added tokens);
* ``tokenizer_config.json`` (optional): the named special tokens (``bos_token``,
  ``eos_token``, ... as a string or an ``AddedToken`` dict), ``add_bos_token`` /
  ``add_eos_token`` (added on encode when the post-processor does not already add them) and
  ``chat_template`` (a string, or a list of ``{"name", "template"}`` where ``default`` is
  used); ``chat_template.jinja`` beside it takes precedence, as in transformers 5;
* ``generation_config.json``'s ``eos_token_id`` (an int or a list), else ``config.json``'s:
  with the tokenizer's ``eos_token`` they form :attr:`Tokenizer.eos_token_ids`.

:class:`IncrementalDetokenizer` streams the text of a growing id sequence: each
:meth:`~IncrementalDetokenizer.add` returns only text that is complete, so a UTF-8
character split over several byte-level tokens comes out whole, once (the prefix/read
offsets of vLLM's and TGI's detokenizers: a window is re-decoded and text ending in U+FFFD
is held back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import TokenizerError
from .chat_template import render_chat_template

__all__ = ["Tokenizer", "IncrementalDetokenizer", "SPECIAL_TOKEN_NAMES", "read_eos_token_ids"]
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _token_text(v: Any, where: str) -> str | None:
    """A special token given as a string or as an AddedToken dict ``{"content": ...}``."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    raise TokenizerError(f"{where}: expected a string or {{'content': str}}, got {v!r}")


def _eos_list(v: Any, where: str) -> list[int]:
    if v is None:
        return []
    vals = v if isinstance(v, list) else [v]
    if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in vals):
        raise TokenizerError(f"{where}: eos_token_id must be an int >= 0 or a list of them, got {v!r}")
    return list(vals)


def read_eos_token_ids(path: str | Path) -> list[int]:
    """EOS ids of a model directory: ``generation_config.json``'s ``eos_token_id`` (an int or
    a list) when it has one, else ``config.json``'s; [] when neither does. Raises
    TokenizerError naming the file for a malformed value."""
    d = Path(path).expanduser()
    gen = _read_json(d / "generation_config.json")
    if gen is not None and gen.get("eos_token_id") is not None:
        return _eos_list(gen["eos_token_id"], str(d / "generation_config.json"))
    conf = _read_json(d / "config.json") or {}
    return _eos_list(conf.get("eos_token_id"), str(d / "config.json"))


class Tokenizer:
    """Text <-> ids for one model (see the module docstring for the files read).

    Build with :meth:`from_dir`. Attributes: ``bos_token`` / ``eos_token`` / ... (str or
    None), ``bos_token_id``, ``chat_template`` (str or None), :attr:`eos_token_ids`,
    :attr:`vocab_size`."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None, chat_template: str | None = None,
                 eos_token_ids: Iterable[int] = (), source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        config = config or {}
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            t = _token_text(config.get(name), f"{source}/tokenizer_config.json {name}")
            if t is not None:
                self.special_tokens[name] = t
                setattr(self, name, t)
            else:
                setattr(self, name, None)
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.add_eos_token = bool(config.get("add_eos_token", False)) and eos_id is not None
        self._eos_id = eos_id
        ids = set(eos_token_ids) | ({eos_id} if eos_id is not None else set())
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        self.chat_template = chat_template

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Read the tokenizer of a Hugging Face model directory.

        Raises TokenizerError naming the file when ``tokenizer.json`` is missing or a file
        is malformed (FileNotFoundError-like messages: ``<dir>/tokenizer.json: missing``)."""
        d = Path(path).expanduser()
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj}: missing (a model directory needs tokenizer.json for text in/out; "
                                 "give token ids instead, or add the model's tokenizer files)")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust library raises a bare Exception
            raise TokenizerError(f"{tj}: cannot be read by the tokenizers library ({e})") from None
        config = _read_json(d / "tokenizer_config.json") or {}
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{d / 'tokenizer_config.json'}: chat_template must be a string, got {template!r}")
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(tok, config, template, read_eos_token_ids(d), source=str(d))

    # ------------------------------------------------------------------ ids <-> text
    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer knows (added tokens included); may be below the model's
        ``vocab_size`` (padded embeddings), never above it for a consistent checkpoint."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``. With ``add_special_tokens`` the post-processor's special tokens and
        the configured BOS/EOS (``add_bos_token``/``add_eos_token``) are added once.
        Raises TypeError when ``text`` is not a str."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and (not ids or ids[-1] != self._eos_id):
                ids = ids + [self._eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (ints; ids the tokenizer does not know decode to nothing, as in the
        tokenizers library). Special tokens are dropped with ``skip_special_tokens``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary / added token string, None if unknown."""
        return self._tok.token_to_id(token)

    def incremental(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """A fresh :class:`IncrementalDetokenizer` over this tokenizer."""
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        """The prompt text of ``messages`` rendered with the model's chat template as
        transformers' ``apply_chat_template(..., tokenize=False)`` renders it (special tokens
        visible to the template; ``template_kwargs`` such as ``enable_thinking=False``,
        ``tools=[...]`` passed through). Encode the result with ``add_special_tokens=False``.

        Raises TokenizerError when the tokenizer has no chat template or the template fails."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: no chat_template (tokenizer_config.json 'chat_template' or "
                                 "chat_template.jinja); use a plain prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **template_kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Ids of :meth:`apply_chat_template` (encoded without adding special tokens, as
        transformers' ``apply_chat_template(tokenize=True)``)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_kwargs),
                           add_special_tokens=False)


class IncrementalDetokenizer:
    """Text of a growing id sequence, emitted as it becomes complete.

    ``add(id)`` returns the newly complete text (possibly ""), ``finish()`` the rest (a
    sequence cut inside a character ends with U+FFFD, as a full decode would). The
    concatenation of everything returned equals ``tokenizer.decode(all ids)`` for the
    tokenizers tested (byte-level BPE)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window re-decoded for context
        self.read_offset = 0  # ids before this have had their text emitted

    def add(self, token_id: int) -> str:
        """Append ``token_id``; return the text it completes (held back while it ends in an
        incomplete UTF-8 character)."""
        self.ids.append(int(token_id))
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = dec(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def finish(self) -> str:
        """The text not yet returned (flushes a held-back partial character)."""
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = dec(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
