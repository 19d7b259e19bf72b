"""``python -m llm_kernels generate``: text (or ids) in, text out, with sampling, streaming
and an interactive multi-turn ``--chat``.

* ``--prompt TEXT`` (default ``"Once upon a time"`` when the checkpoint has a tokenizer) or
  ``--prompt-ids 1,2,3`` (the default without a tokenizer): the prompt, then the generated
  text streamed to stdout as it decodes (always, TTY or not; a UTF-8 character split over
  byte-level tokens is printed once whole), then the ids, the finish reason, prefill /
  decode tok/s and the time per stage (``--quiet``: the generated text only).
* ``--chat``: reads user messages from stdin, one per line (``/reset`` forgets the
  conversation, ``/exit`` or end of input stops), renders the conversation with the chat
  template and streams each reply. The conversation's cache is reused between turns when
  the new rendered prompt extends the tokens already in the cache; otherwise the turn is
  prefilled again (said on stderr with the reused token count).
* Sampling: ``--temperature --top-k --top-p --min-p --repetition-penalty
  --presence-penalty --frequency-penalty --seed --stop (repeatable) --ignore-eos``; unset
  flags take ``generation_config.json``'s values (:meth:`SamplingParams.from_generation_config`).
  Generation stops on EOS (generation_config / tokenizer), a stop string or
  ``--max-new-tokens``.
* ``--nproc N [--pp K]`` (or torchrun): every rank runs the same generation (same prompt,
  same sampling seed: rank 0 draws it when ``--seed`` is not given), the model split as for
  ``logits`` (docs/distributed.md); rank 0 alone prints, with its layout, memory and
  communication. The output is the one-process output given the same ``--threads`` per
  process. ``--chat`` is refused over ranks, ``--speculative mtp`` with pipeline stages.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch

from .text.sampling import SamplingParams

__all__ = ["add_generate_parser", "cmd_generate", "DEFAULT_TEXT", "DEFAULT_IDS"]

DEFAULT_TEXT = "Once upon a time"
DEFAULT_IDS = [1, 2, 3, 4, 5, 6, 7, 8]
DEFAULT_MAX_NEW_TOKENS = 32
CHAT_MAX_SEQ_LEN = 4096
# SamplingParams field -> the flag that sets it (for error messages)
_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(SamplingParams)}
_FLAGS["max_tokens"] = "--max-new-tokens"


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_prefill_chunk_arg(p: argparse.ArgumentParser) -> None:
    """``--prefill-chunk N`` (aliases ``-ub``, ``--ubatch-size``: llama.cpp's names) on ``p``:
    prompt rows per engine step, 0 = the whole prompt in one step (dest ``prefill_chunk``)."""
    from .runtime.engine_core import DEFAULT_PREFILL_CHUNK

    p.add_argument("--prefill-chunk", "-ub", "--ubatch-size", dest="prefill_chunk", type=_non_negative_int,
                   default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help=f"chunked prefill: prompt rows per engine step (default {DEFAULT_PREFILL_CHUNK}; 0 = the "
                        "whole prompt in one step); bounds the prefill's activation memory (docs/runtime.md)")


def add_generate_parser(sub, ids_type: Callable[[str], list[int]],
                        backend_args: Callable[[argparse.ArgumentParser, str], None]) -> argparse.ArgumentParser:
    """Register ``generate`` on the CLI's subparsers (``ids_type``: the comma-separated ids
    parser; ``backend_args``: adds ``--backend``/``--quant``)."""
    g = sub.add_parser("generate", help="text generation (prompt, ids or interactive chat) with sampling and timings")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="HF checkpoint directory (default: the embedded mini checkpoint)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help=f"prompt text (default {DEFAULT_TEXT!r} with a tokenizer)")
    src.add_argument("--prompt-ids", type=ids_type, default=None,
                     help="comma-separated prompt ids (default without a tokenizer: 1,...,8)")
    src.add_argument("--chat", action="store_true", help="interactive multi-turn chat reading stdin")
    g.add_argument("--system", default=None, help="--chat: a system message")
    g.add_argument("--no-think", action="store_true", help="--chat: render with enable_thinking=False (Qwen3)")
    g.add_argument("--max-new-tokens", type=_non_negative_int, default=None,
                   help=f"new tokens at most (>= 0; default: generation_config.json's max_new_tokens, else "
                        f"{DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help=f"cache tokens per sequence (default: prompt + max new tokens; --chat: {CHAT_MAX_SEQ_LEN})")
    s = g.add_argument_group("sampling (unset: generation_config.json; temperature 0 = greedy)")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None, help="0 = off")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--presence-penalty", type=float, default=None)
    s.add_argument("--frequency-penalty", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--quiet", "-q", action="store_true", help="print the generated text only")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    g.add_argument("--threads", type=int, default=0, help="torch and kernel threads per process (0: all CPUs; with --nproc: CPUs / ranks)")
    g.add_argument("--speculative", choices=["mtp"], default=None,
                   help="speculative decoding with the model's MTP block (DeepSeek-V4 checkpoints with mtp.*): "
                        "one draft per step, verified by the main model; greedy output is unchanged")
    g.add_argument("--draft-tokens", type=int, default=1, help="drafts per step with --speculative (only 1)")
    add_prefill_chunk_arg(g)
    backend_args(g, "fused")
    from .cli_ranks import add_rank_args

    add_rank_args(g, "generate")
    g.set_defaults(func=cmd_generate)
    return g


def _sampling_params(args: argparse.Namespace, ckpt: Path) -> SamplingParams:
    """generation_config.json's defaults with the flags given on top (``--max-new-tokens``
    unset and no ``max_new_tokens`` there: 32); ValueError naming the flag."""
    max_tokens = args.max_new_tokens
    try:
        if max_tokens is None and SamplingParams.from_generation_config(ckpt).max_tokens == SamplingParams.max_tokens:
            max_tokens = DEFAULT_MAX_NEW_TOKENS  # the file does not set max_new_tokens (or sets the class default)
        return SamplingParams.from_generation_config(
            ckpt, max_tokens=max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    except ValueError as e:
        msg = str(e)
        for field, flag in _FLAGS.items():
            msg = msg.replace(f"SamplingParams.{field} ", f"{flag} ")
        raise ValueError(msg) from None


def _ranks_wanted(args: argparse.Namespace) -> bool:
    """True when this command runs over ranks (``--nproc`` > 1 or a torchrun environment of
    more than one rank)."""
    import os

    try:
        return args.nproc > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return True  # rank_entry names the bad variable


def _refuse_over_ranks(args: argparse.Namespace) -> None:
    """The modes that do not run over ranks, refused before any rank starts (SystemExit
    naming the option). Needs ``args.checkpoint``."""
    import os

    if args.chat:
        raise SystemExit("error: --chat does not run over ranks (--nproc / torchrun): it reads stdin interactively "
                         "in one process; use --prompt or --prompt-ids with --nproc")
    if args.speculative is None:
        return
    from .cli_ranks import check_layout

    world = args.nproc if args.nproc > 1 else int(os.environ.get("WORLD_SIZE", "1"))
    if check_layout(Path(args.checkpoint).expanduser(), world, args.pp).pp > 1:
        raise SystemExit(f"error: --speculative {args.speculative} does not run over pipeline stages (--pp): an "
                         "engine of a pipeline stage has no MTP block (it runs with expert shards only: no --pp), or "
                         "run it in one process (without --nproc)")


def cmd_generate(args: argparse.Namespace) -> int:
    """The ``generate`` command (see the module docstring). Returns the exit code. With
    ``--nproc N`` (or under torchrun) every rank runs the same generation (same prompt,
    same sampling seed: rank 0 draws one when ``--seed`` is not given) and rank 0 alone
    prints; see docs/distributed.md."""
    from .checkpoint.defaults import default_checkpoint
    from .cli_ranks import rank_entry
    from .text.tokenizer import Tokenizer

    where = None
    if _ranks_wanted(args):
        if args.checkpoint is None:  # written once here, before the ranks (each would write it)
            args.checkpoint = default_checkpoint()
        _refuse_over_ranks(args)
        where = rank_entry(args)
        if isinstance(where, int):  # the local ranks ran (--nproc N): their exit code
            return where
    threads = args.threads
    if where is not None and not threads:
        from .distributed.runner import default_threads

        threads = default_threads()
    if threads:
        from .runtime.builder import set_threads

        try:
            set_threads(threads)
        except ValueError as e:
            raise SystemExit(f"error: --{e}") from None
    ckpt = Path(args.checkpoint).expanduser() if args.checkpoint is not None else default_checkpoint()
    params = _sampling_params(args, ckpt)
    tok = Tokenizer.from_dir(ckpt) if (ckpt / "tokenizer.json").is_file() else None
    if (args.prompt is not None or args.chat) and tok is None:
        raise SystemExit(f"error: {ckpt / 'tokenizer.json'} is missing: --prompt/--chat need the model's tokenizer; "
                         "use --prompt-ids")
    prompt_ids: list[int] = []
    if not args.chat:
        if args.prompt_ids is not None:
            prompt_ids = args.prompt_ids
        else:
            prompt_ids = tok.encode(args.prompt if args.prompt is not None else DEFAULT_TEXT) if tok else DEFAULT_IDS
        if not prompt_ids:
            raise SystemExit("error: the prompt is empty (no token ids)")
    from . import models

    limit = getattr(models.load_config(ckpt), "max_position_embeddings", None)
    need = len(prompt_ids) + max(params.max_tokens, 1)
    if not args.chat and args.max_seq_len is None and limit is not None and need > limit:
        raise ValueError(f"--max-new-tokens {params.max_tokens}: the prompt ({len(prompt_ids)} tokens) plus the new "
                         f"tokens exceed the model's max_position_embeddings = {limit}")
    max_len = args.max_seq_len or (min(CHAT_MAX_SEQ_LEN, limit or CHAT_MAX_SEQ_LEN) if args.chat else need)
    run = _Run(args, ckpt, params, tok, prompt_ids, max_len)
    if where is None:
        return run(None)
    from dataclasses import asdict

    from .cli_ranks import check_layout
    from .distributed.runner import run_rank

    rank, world = where
    layout = check_layout(ckpt, world, args.pp, rank)  # before the rendezvous
    settings = dict(command="generate", world=world, pp=layout.pp, dtype=args.dtype, quant=args.quant,
                    backend=args.backend, prompt_ids=prompt_ids, params=repr(asdict(params)), threads=threads,
                    prefill_chunk=args.prefill_chunk, max_len=max_len, speculative=args.speculative)
    return run_rank(run, rank=rank, world_size=world, timeout=args.ep_timeout, settings=settings, checkpoint=ckpt,
                    layout=layout)


class _Run:
    """The generation after the argument checks: ``run(None)`` in one process, ``run(ctx)``
    as one rank (the body of :func:`~llm_kernels.distributed.runner.run_rank`: the same
    loop on every rank, stdout on rank 0 only)."""

    def __init__(self, args, ckpt: Path, params: SamplingParams, tok, prompt_ids: list[int], max_len: int):
        self.args, self.ckpt, self.params, self.tok = args, ckpt, params, tok
        self.prompt_ids, self.max_len = prompt_ids, max_len

    def __call__(self, ctx) -> int:
        if ctx is None:
            return self._generate(None)
        from dataclasses import replace

        from .distributed.commands import root_stdout, shared_seed

        self.params = replace(self.params, seed=shared_seed(ctx, self.params.seed))
        with root_stdout(ctx):
            return self._generate(ctx)

    def _generate(self, ctx) -> int:
        from .api import LLM
        from .runtime.builder import warm_up
        from .runtime.timing import StageTimer

        args, ckpt, params, tok, prompt_ids = self.args, self.ckpt, self.params, self.tok, self.prompt_ids
        timer = StageTimer()
        # two sequences: the warm-up's throwaway one and the real one
        llm = LLM(ckpt, backend=args.backend, quant=args.quant, dtype=args.dtype, max_seq_len=self.max_len,
                  max_batch=2, timer=timer, progress=ctx is None, speculative=args.speculative,
                  draft_tokens=args.draft_tokens, prefill_chunk=args.prefill_chunk, ranks=ctx)
        if prompt_ids:
            llm.encode_prompts([prompt_ids])  # ids in the vocabulary, within max_seq_len (ValueError naming them)
        quiet = args.quiet
        if not quiet:
            from .checkpoint.release import quant_label
            from .checkpoint.safetensors_io import checkpoint_quant

            print(f"checkpoint: {ckpt}\nmodel: {llm.cfg.summary()}\ndtype: {args.dtype}, "
                  f"quant: {quant_label(checkpoint_quant(ckpt), args.quant)}, "
                  f"backend: {args.backend}, threads: {torch.get_num_threads()}"
                  + (" per rank" if ctx is not None else ""))
            if ctx is not None:
                print(f"ranks: {ctx.layout.describe()}; {ctx.memory_line(llm.engine.w)}")
        t_warm = warm_up(llm.engine, prompt_ids or [0], args.backend)
        if not quiet:
            print(f"warm-up (kernel compile/load, one prefill + one decode step; not in the figures below): "
                  f"{t_warm:.2f} s", flush=True)
        if args.chat:
            return _chat_loop(llm, params, args)
        timer.reset()
        meter = None
        if ctx is not None:
            from .distributed.commands import CommMeter

            meter = CommMeter(ctx)
            meter.start()
        if tok is not None and not quiet:
            print(tok.decode(prompt_ids), end="", flush=True)
        prefill_stages: dict[str, float] = {}

        def on_text(_i: int, text: str) -> None:
            if not prefill_stages:  # the first text comes right after the prefill step
                prefill_stages.update(timer.seconds)
            print(text, end="", flush=True)

        t0 = time.perf_counter()
        (out,) = llm.generate([prompt_ids], params, on_text=on_text if tok is not None else None)
        print("", flush=True)
        if meter is not None:
            meter.stop()
        if quiet:
            return 0
        tm = out.timings
        n_dec = max(len(out.token_ids) - 1, 0)  # the first new token comes from the prefill logits
        print(f"prompt ids:    {','.join(map(str, prompt_ids))}")
        print(f"generated ids: {','.join(map(str, out.token_ids))}")
        print(f"finish reason: {out.finish_reason}" + (f" ({out.stop_reason!r})" if out.stop_reason is not None else ""))
        print(f"prefill: {len(prompt_ids)} tokens in {tm['prefill_s'] * 1e3:.1f} ms = "
              f"{len(prompt_ids) / max(tm['prefill_s'], 1e-9):.1f} tok/s")
        if n_dec:
            print(f"decode:  {n_dec} tokens in {tm['decode_s'] * 1e3:.1f} ms = {n_dec / tm['decode_s']:.1f} tok/s "
                  f"({tm['decode_s'] / n_dec * 1e3:.2f} ms/token)")
        if "spec_steps" in tm:
            print(f"speculative (mtp): {int(tm['spec_steps'])} verify steps, {int(tm['accepted_tokens'])} of "
                  f"{int(tm['draft_tokens'])} drafts accepted (acceptance {tm['acceptance_rate']:.1%}), "
                  f"{tm['tokens_per_step']:.2f} tokens per step")
        if meter is not None:
            print(_comm_line(meter.take(), n_dec, tm))
        print(f"total: {time.perf_counter() - t0:.2f} s (sampling, detokenization and printing included)")
        print("time per stage" + (" on rank 0" if ctx is not None else "")
              + " (prefill ms | decode ms per step | decode share):")
        dec = {k: v - prefill_stages.get(k, 0.0) for k, v in timer.seconds.items()}
        total = sum(dec.values()) or 1.0
        for stage, _sec, _calls, _share in timer.table():
            print(f"  {stage:20s} {prefill_stages.get(stage, 0.0) * 1e3:9.2f} | "
                  f"{dec[stage] / max(n_dec, 1) * 1e3:9.3f} | {dec[stage] / total:6.1%}")
        return 0


def _comm_line(c: dict, n_dec: int, tm: dict) -> str:
    """Rank 0's communication during the generation (prefill + decode steps), per step."""
    steps = n_dec + 1  # the prefill step, then one per decoded token
    from .distributed.commands import comm_parts

    run_s = tm["prefill_s"] + tm["decode_s"]
    parts = comm_parts(c, steps)
    share = (c["ep_s"] + c["pipe_s"]) / run_s if run_s > 0 else 0.0
    return (f"communication (rank 0, mean per step over {steps} steps: the prefill + {n_dec} decode; waiting for the "
            f"other ranks included): " + ("; ".join(parts) or "none") + f"; {share:.1%} of the run's step time")


def _chat_loop(llm, params: SamplingParams, args: argparse.Namespace) -> int:
    """Interactive chat over stdin (see the module docstring)."""
    interactive = sys.stdin.isatty()
    session = llm.chat_session(system=args.system, **({"enable_thinking": False} if args.no_think else {}))
    if interactive:
        print("chat: one message per line; /reset forgets the conversation, /exit (or Ctrl-D) quits",
              file=sys.stderr)
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            msg = line.rstrip("\n")
            if msg.strip() == "/exit":
                break
            if msg.strip() == "/reset":
                session.close()
                print("(conversation reset)", file=sys.stderr)
                continue
            if not msg.strip():
                continue
            try:
                out = session.send(msg, params, on_text=lambda s: print(s, end="", flush=True))
            except ValueError as e:  # the conversation outgrew max_seq_len
                print(f"\nerror: {e}; conversation reset (--max-seq-len raises the limit)", file=sys.stderr)
                session.close()
                continue
            print("", flush=True)
            tm = out.timings
            if not args.quiet:
                print(f"[{len(out.token_ids)} tokens, finish: {out.finish_reason}, prefill {tm['prompt_tokens'] - tm['cached_tokens']}"
                      f" tokens (reused {tm['cached_tokens']} cached), decode {tm['decode_tok_s']:.1f} tok/s]",
                      file=sys.stderr, flush=True)
    finally:
        session.close()
    return 0
