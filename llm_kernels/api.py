"""The Python API: text in, text out over the engines.

```python
from llm_kernels import LLM, SamplingParams

llm = LLM("path/to/checkpoint", backend="fused", quant="int8")      # or LLM() for the embedded mini
out = llm.generate(["Hello", "你好"], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, seed=0))
print(out[0].text, out[0].finish_reason, out[0].timings["decode_tok_s"])
reply = llm.chat([{"role": "user", "content": "Hi!"}], enable_thinking=False)
chat = llm.chat_session()                      # multi-turn, the cache reused between turns
print(chat.send("Hi!").text, chat.send("And then?").text)
```

:meth:`LLM.generate` runs its prompts as one ragged batch: up to ``max_batch`` sequences at
a time, prefilled together (the head reads the last prompt row only, ``logits_rows="last"``;
more than ``prefill_chunk`` prompt rows run as successive steps of at most that many rows,
see ``EngineCore.step``), then one decode step for all running sequences; a sequence leaves
the batch (and frees its cache) as soon as it finishes, and a waiting prompt takes its place.
The engine is the CLI's (:mod:`llm_kernels.runtime.builder`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import TokenizerError
from .runtime.builder import DTYPES, build_engine, load_model, set_threads
from .runtime.engine_core import DEFAULT_PREFILL_CHUNK, check_chunk_tokens, plan_chunks
from .runtime.speculative import SpecStats, propose, verify
from .text.decoding import DecodeState
from .text.sampling import SamplingParams
from .text.tokenizer import Tokenizer, read_eos_token_ids

__all__ = ["LLM", "Completion", "ChatSession", "SamplingParams", "DEFAULT_MAX_SEQ_LEN"]

DEFAULT_MAX_SEQ_LEN = 4096
OnText = Callable[[int, str], None]


@dataclass
class Completion:
    """One finished sequence.

    ``text``: the generated text (stop string excluded); ``token_ids``: generated ids (a final
    EOS / stop id included); ``prompt_token_ids``; ``finish_reason``: "stop" or "length";
    ``stop_reason``: the stop string or stop id that ended it (None for EOS / length);
    ``timings``: ``prefill_s`` (its prefill step), ``decode_s`` (the decode steps it took part
    in), ``ttft_s`` (call start to first token), ``total_s``, ``prompt_tokens``,
    ``completion_tokens``, ``decode_tok_s``, ``cached_tokens`` (reused from a chat session's
    cache, else 0)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)
    stop_reason: str | int | None = None


@dataclass
class _Request:
    index: int
    state: DecodeState
    feed: list[int]  # ids to prefill (the whole prompt, or a chat session's new suffix)
    sid: int | None = None
    keep: bool = False  # a chat session's sequence: not released at the end
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    done_s: float = 0.0
    live: bool = False  # holds an engine sequence this call must release
    draft: int | None = None  # speculative decoding: the pending draft token
    draft_q: torch.Tensor | None = None  # and its draft distribution (sampling)
    spec: SpecStats | None = None


class LLM:
    """A loaded model with its tokenizer and engine.

    Args:
        path: checkpoint directory (None: the embedded default ``mini`` checkpoint).
        backend: "fused" (Numba kernels) or "reference" (torch).
        quant: None (as stored), "none" (must be float), or an INT8 scheme such as "w8a8" /
            "int8" (quantized on load from a float checkpoint).
        dtype: "bfloat16" or "float32" (or the torch dtype).
        max_seq_len: tokens per sequence (default min(4096, the model's max positions)).
        threads: torch and kernel threads (None: leave as is).
        max_batch: sequences run at once (the engine's cache is sized for it).
        timer: optional :class:`~llm_kernels.runtime.timing.StageTimer` for per-stage times.
        progress: tqdm bars while loading.
        speculative: None, or ``"mtp"``: speculative decoding with the model's MTP block
            (DeepSeek-V4; the checkpoint must hold ``mtp.*``): each decode step verifies one
            draft token per sequence (:mod:`llm_kernels.runtime.speculative`); greedy output
            is the plain greedy output. Completions' timings then report
            ``acceptance_rate`` and ``tokens_per_step``.
        draft_tokens: drafts per step (only 1: the MTP block re-applied for k > 1 is not
            implemented, docs/speculative.md says why).
        prefill_chunk: prompt rows per engine step (chunked prefill, llama.cpp's
            ``--ubatch-size``; default :data:`~llm_kernels.runtime.engine_core.DEFAULT_PREFILL_CHUNK`;
            0 / None: a whole prompt batch in one step). Bounds the prefill's activation
            memory; the engine attribute ``engine.prefill_chunk`` may be changed later.
        ranks: None, or a :class:`~llm_kernels.distributed.runner.RankContext`: this process
            is one rank of a group (``generate --nproc``): it loads its part of the checkpoint
            (``ranks.load``), builds its stage's engine (``ranks.engine_kwargs()``) and wraps
            it (``ranks.wrap``); every rank must then make the same calls. ``path`` must be
            given; ``speculative`` needs a ``RankContext.load`` that takes ``mtp=`` (ValueError
            otherwise) and expert shards only (a pipeline stage's engine has no MTP block).

    Attributes: ``cfg``, ``engine``, ``tokenizer`` (None when the directory has no
    ``tokenizer.json``: ids in, ids out), ``default_params`` (from ``generation_config.json``),
    ``eos_token_ids``, ``path``.

    Raises CheckpointError / ConfigError for a bad checkpoint, TokenizerError for malformed
    tokenizer files, ValueError for a bad option (naming it)."""

    def __init__(self, path: str | Path | None = None, backend: str = "fused", quant: str | None = None,
                 dtype: str | torch.dtype = "bfloat16", max_seq_len: int | None = None, threads: int | None = None,
                 max_batch: int = 8, timer=None, progress: bool = False, speculative: str | None = None,
                 draft_tokens: int = 1, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, ranks=None):
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
        if draft_tokens != 1:
            raise ValueError(f"draft_tokens must be 1 (one MTP draft per step), got {draft_tokens!r}")
        check_chunk_tokens(prefill_chunk)
        if threads:
            set_threads(threads)
        if ranks is not None:
            if path is None:
                raise ValueError("ranks: give the checkpoint path (every rank must load the same one)")
            self.path = Path(path).expanduser()
            self.cfg, weights = ranks.load(self.path, dtype, quant, mtp=speculative is not None)
        else:
            self.path, self.cfg, weights = load_model(path, dtype, quant, progress, mtp=speculative == "mtp")
        limit = getattr(self.cfg, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, limit)
        if not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len must be an int in [1, {limit}] (the model's max_position_embeddings), "
                             f"got {max_seq_len!r}")
        self.dtype, self.backend, self.quant = dtype, backend, quant
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        self.tokenizer = Tokenizer.from_dir(self.path) if (self.path / "tokenizer.json").is_file() else None
        self.eos_token_ids = (self.tokenizer.eos_token_ids if self.tokenizer is not None
                              else frozenset(read_eos_token_ids(self.path)))
        self.default_params = SamplingParams.from_generation_config(self.path)
        self.engine = build_engine(weights, self.cfg, dtype, max_seq_len, backend, timer, batch=max_batch,
                                   prefill_chunk=prefill_chunk, **(ranks.engine_kwargs() if ranks else {}))
        del weights
        if ranks is not None:
            self.engine = ranks.wrap(self.engine)
        self.speculative = speculative
        if speculative is not None:
            if not getattr(self.engine, "has_mtp", False):
                raise ValueError(f"speculative='mtp' needs a model with an MTP block; {self.path} has none")
            self.engine.journaling = True

    # ------------------------------------------------------------------ prompts
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError(f"{self.path / 'tokenizer.json'}: missing, so text prompts cannot be encoded; "
                                 "pass token ids (list[list[int]]) instead")
        return self.tokenizer

    def encode_prompts(self, prompts: str | Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Prompt ids of ``prompts``: a str, a list of str (encoded with special tokens), a list
        of id lists, or one list of ints. Raises ValueError for an empty prompt list / prompt, an
        id outside the vocabulary or a prompt longer than ``max_seq_len``; TypeError otherwise."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            prompts = [prompts]  # one prompt given as ids
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self._require_tokenizer().encode(p)
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids = list(p)
            else:
                raise TypeError(f"prompts[{i}]: expected a str or a list of int ids, got {type(p).__name__}")
            self._check_prompt(ids, f"prompts[{i}]")
            out.append(ids)
        return out

    def _check_prompt(self, ids: list[int], what: str) -> None:
        V = self.cfg.vocab_size
        if not ids:
            raise ValueError(f"{what}: empty prompt (no token ids)")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"{what}: token ids must be in [0, {V}), got {bad[:5]}")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"{what}: {len(ids)} tokens exceed max_seq_len = {self.max_seq_len}")

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        return (params if params is not None else dataclasses.replace(self.default_params)).validate(
            vocab_size=self.cfg.vocab_size)

    def _state(self, params: SamplingParams, prompt_ids: list[int], cached: int = 0) -> DecodeState:
        # the cache holds prompt + all generated ids but the last: clamp max_tokens to fit
        room = self.max_seq_len - len(prompt_ids) - cached + 1
        if params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room)
        return DecodeState(params, prompt_ids, self.tokenizer, self.eos_token_ids)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None, on_text: OnText | None = None) -> list[Completion]:
        """Generate for every prompt (one ragged batch, see the module docstring).

        Args:
            prompts: a str, a list of str, or a list of token-id lists.
            params: :class:`SamplingParams` (None: ``default_params`` from
                generation_config.json). ``max_tokens`` is clamped so a sequence fits
                ``max_seq_len`` (finish_reason "length").
            on_text: called as ``on_text(prompt_index, text)`` with each new piece of text
                as it is decoded (streaming; never a partial UTF-8 character).

        Returns one :class:`Completion` per prompt, in order. Raises ValueError / TypeError /
        TokenizerError for bad prompts or params (before anything runs)."""
        params = self._params(params)
        ids = self.encode_prompts(prompts)
        reqs = [_Request(i, self._state(params, p), feed=p) for i, p in enumerate(ids)]
        self._run(reqs, on_text)
        return [self._completion(r) for r in reqs]

    def chat(self, messages: list[dict], params: SamplingParams | None = None, on_text: OnText | None = None,
             **template_kwargs) -> Completion:
        """One assistant reply to ``messages`` (rendered with the chat template;
        ``template_kwargs`` such as ``enable_thinking=False`` go to the template)."""
        ids = self._require_tokenizer().encode_chat(messages, **template_kwargs)
        self._check_prompt(ids, "messages")
        return self.generate([ids], params, on_text)[0]

    def chat_session(self, system: str | None = None, **template_kwargs) -> "ChatSession":
        """A multi-turn conversation that keeps its sequence in the engine between turns."""
        return ChatSession(self, system, **template_kwargs)

    def _completion(self, r: _Request) -> Completion:
        s = r.state
        n = len(s.token_ids)
        timings = {"prefill_s": r.prefill_s, "decode_s": r.decode_s, "ttft_s": r.ttft_s, "total_s": r.done_s,
                   "prompt_tokens": len(s.prompt_ids), "completion_tokens": n,
                   "decode_tok_s": (n - 1) / r.decode_s if n > 1 and r.decode_s > 0 else 0.0,
                   "cached_tokens": len(s.prompt_ids) - len(r.feed)}
        if r.spec is not None:
            timings.update(r.spec.as_timings())
        return Completion(s.text, list(s.token_ids), list(s.prompt_ids), s.finish_reason, timings, s.stop_reason)

    def _advance(self, r: _Request, logits: torch.Tensor, on_text: OnText | None, t0: float) -> None:
        self._advance_with(r, r.state.sample(logits), on_text, t0)

    def _advance_with(self, r: _Request, token: int, on_text: OnText | None, t0: float) -> None:
        if not r.state.token_ids:
            r.ttft_s = time.perf_counter() - t0
        text = r.state.push(token)
        if text and on_text is not None:
            on_text(r.index, text)

    def _finish(self, r: _Request, t0: float) -> None:
        r.done_s = time.perf_counter() - t0
        if r.live and not r.keep:
            self.engine.release(r.sid)
            r.live = False

    def _run(self, reqs: list[_Request], on_text: OnText | None) -> None:
        """The batch loop: admit waiting requests (one prefill step), then one decode step for
        every running one; finished sequences are released at once. On an error every
        sequence this call created is released."""
        eng, t0 = self.engine, time.perf_counter()
        pending, active = deque(reqs), []
        try:
            while pending or active:
                admit = []
                while pending and len(active) + len(admit) < self.max_batch:
                    r = pending.popleft()
                    if r.sid is None:
                        r.sid, r.live = eng.add_sequence(), True
                    admit.append(r)
                if admit:
                    t = time.perf_counter()
                    hidden: list = []  # speculative: the main model's final rows of every sub-step

                    def keep_hidden(sids, toks, hidden=hidden):
                        hidden.append((sids, [len(x) for x in toks], eng.last_hidden))

                    rows = eng.step([r.sid for r in admit], [r.feed for r in admit], logits_rows="last",
                                    on_chunk=keep_hidden if self.speculative else None)
                    dt = time.perf_counter() - t
                    for r, lg in zip(admit, rows):
                        r.prefill_s = dt
                        if not r.state.finished:  # max_tokens == 0: prefill only
                            self._advance(r, lg[-1], on_text, t0)
                        (self._finish(r, t0) if r.state.finished else active.append(r))
                    if self.speculative:
                        self._draft(admit, [r.feed for r in admit], [r.feed for r in admit], _by_sequence(hidden))
                    del hidden
                if active and self.speculative:
                    t = time.perf_counter()
                    self._speculative_step(active, on_text, t0)
                    dt = time.perf_counter() - t
                    for r in active:
                        r.decode_s += dt
                        if r.state.finished:
                            self._finish(r, t0)
                    active = [r for r in active if not r.state.finished]
                elif active:
                    t = time.perf_counter()
                    rows = eng.decode([r.sid for r in active], [r.state.token_ids[-1] for r in active])
                    dt = time.perf_counter() - t
                    for r, lg in zip(active, rows):
                        r.decode_s += dt
                        self._advance(r, lg[-1], on_text, t0)
                        if r.state.finished:
                            self._finish(r, t0)
                    active = [r for r in active if not r.state.finished]
        finally:
            for r in reqs:
                if r.live and not r.keep:
                    eng.release(r.sid)
                    r.live = False


    # ------------------------------------------------------------------ speculative decoding
    def _draft(self, reqs: list[_Request], fed: list[list[int]], kept: list[list[int]],
               hidden: dict[int, torch.Tensor] | None = None) -> None:
        """After a step that fed ``fed[i]`` to ``reqs[i]``, of which the first ``kept[i]``
        rows stayed: run the MTP block over the kept rows (next ids: the kept ids shifted by
        one, then the token sampled last) and set each running request's draft. Finished
        sequences are skipped unless kept (a chat session's: its MTP rows stay current). A
        sequence whose MTP rows lag (a chat turn after a failed one) gets no draft.
        ``hidden``: sequence id -> the step's final hidden rows of that sequence (a chunked
        prefill's, gathered by its ``on_chunk``); default: ``engine.last_hidden`` of one
        step. The MTP block runs in pieces of at most ``engine.prefill_chunk`` rows (each
        piece computes one head row per sequence: the draft API's)."""
        eng = self.engine
        if hidden is None:
            hidden, o = {}, 0
            for r, f in zip(reqs, fed):  # row offsets of the step
                hidden[r.sid] = eng.last_hidden[o:o + len(f)]
                o += len(f)
        go = []
        for r, k in zip(reqs, kept):
            r.draft, r.draft_q = None, None
            if ((r.keep or (r.live and not r.state.finished)) and r.state.token_ids and k
                    and eng.mtp_length(r.sid) == eng.length(r.sid) - len(k)):
                go.append((r, hidden[r.sid][:len(k)], list(k[1:]) + [r.state.token_ids[-1]]))
        if not go:
            return
        chunk = eng.prefill_chunk or sum(len(n) for _, _, n in go)
        last: dict[int, torch.Tensor] = {}
        for sub in plan_chunks([len(n) for _, _, n in go], chunk):
            out = eng.draft([go[b][0].sid for b, _, _ in sub], [go[b][1][lo:hi] for b, lo, hi in sub],
                            [go[b][2][lo:hi] for b, lo, hi in sub])
            for (b, _, hi), lg in zip(sub, out):
                if hi == len(go[b][2]):
                    last[b] = lg
        for b, (r, _, _) in enumerate(go):
            if r.spec is None:
                r.spec = SpecStats()
            if not r.state.finished:
                r.draft, r.draft_q = propose(r.state, last[b][0])

    def _speculative_step(self, active: list[_Request], on_text: OnText | None, t0: float) -> None:
        """One verify step for every running sequence: feed ``[next, draft]`` (or ``[next]``),
        accept or reject the draft (:func:`~llm_kernels.runtime.speculative.verify`), rewind
        rejected rows, then draft the next token with the MTP block."""
        eng = self.engine
        for r in active:  # a draft needs room for its row and a token left to win
            if r.draft is not None and (eng.length(r.sid) + 2 > self.max_seq_len
                                        or r.state.params.max_tokens - len(r.state.token_ids) < 2):
                r.draft, r.draft_q = None, None
        feeds = [[r.state.token_ids[-1]] + ([r.draft] if r.draft is not None else []) for r in active]
        rows = eng.step([r.sid for r in active], feeds, chunk_tokens=0)  # one step: rewind() undoes its rows
        kept = []
        for r, f, lg in zip(active, feeds, rows):
            before = len(r.state.token_ids)
            if r.draft is not None:
                ok, tok = verify(r.state, lg[0], r.draft, r.draft_q)
                r.spec.drafted += 1
                r.spec.accepted += ok
                self._advance_with(r, tok, on_text, t0)
                if ok and not r.state.finished:
                    self._advance(r, lg[1], on_text, t0)
            else:
                self._advance(r, lg[0], on_text, t0)
            pushed = len(r.state.token_ids) - before
            if r.spec is not None:
                r.spec.steps += 1
                r.spec.tokens += pushed
            if pushed < len(f):
                eng.rewind(r.sid, pushed)  # the rejected draft's row (or the one after the final token)
            kept.append(f[:pushed])
        self._draft(active, feeds, kept)


def _by_sequence(chunks: list[tuple[list[int], list[int], torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Sequence id -> its rows of the sub-steps' hidden states ``(seq_ids, rows per
    sequence, hidden [Σrows, ...])``, in order (concatenated when a sequence spans several
    sub-steps)."""
    parts: dict[int, list[torch.Tensor]] = {}
    for sids, lens, h in chunks:
        o = 0
        for s, n in zip(sids, lens):
            parts.setdefault(s, []).append(h[o:o + n])
            o += n
    return {s: p[0] if len(p) == 1 else torch.cat(p, dim=0) for s, p in parts.items()}


class ChatSession:
    """A multi-turn chat over one engine sequence.

    Each :meth:`send` appends the user message, renders the whole conversation with the
    chat template and, when the rendered ids extend what the sequence already holds (its
    earlier prompt plus every generated id but the last), prefills only the new suffix;
    otherwise (the template rewrote an earlier turn, e.g. Qwen3 dropping a ``<think>``
    block, or the reply re-tokenizes differently) it starts the sequence over.
    ``last_reused`` is the number of cached tokens the last turn reused."""

    def __init__(self, llm: LLM, system: str | None = None, **template_kwargs):
        llm._require_tokenizer()
        self.llm = llm
        self.template_kwargs = template_kwargs
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.sid: int | None = None
        self.cached: list[int] = []
        self.last_reused = 0

    def send(self, content: str, params: SamplingParams | None = None,
             on_text: Callable[[str], None] | None = None) -> Completion:
        """The assistant's reply to user message ``content`` (streamed to ``on_text(text)``).
        Raises ValueError when the conversation no longer fits ``max_seq_len`` (the
        message is not added)."""
        llm = self.llm
        params = llm._params(params)
        msgs = self.messages + [{"role": "user", "content": content}]
        ids = llm.tokenizer.encode_chat(msgs, **self.template_kwargs)
        llm._check_prompt(ids, "conversation")
        n = len(self.cached)
        if self.sid is not None and n < len(ids) and ids[:n] == self.cached:
            feed = ids[n:]
        else:
            self.reset()
            feed = ids
        if self.sid is None:
            self.sid = llm.engine.add_sequence()
        self.last_reused = len(ids) - len(feed)
        req = _Request(0, llm._state(params, ids), feed=feed, sid=self.sid, keep=True)
        try:
            llm._run([req], None if on_text is None else (lambda _i, s: on_text(s)))
        except BaseException:
            self.reset()  # the sequence's content is unknown after a failed step
            raise
        out = llm._completion(req)
        self.cached = ids + out.token_ids[:-1]
        self.messages = msgs + [{"role": "assistant", "content": out.text}]
        return out

    def reset(self) -> None:
        """Forget the cached sequence (the messages stay)."""
        if self.sid is not None:
            self.llm.engine.release(self.sid)
        self.sid, self.cached = None, []

    def close(self) -> None:
        """Release the engine sequence and clear the conversation."""
        self.reset()
        self.messages = [m for m in self.messages if m["role"] == "system"][:1]
