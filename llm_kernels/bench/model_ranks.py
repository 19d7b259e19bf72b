"""The model-level benchmark (:mod:`.model`) over ranks: ``bench --checkpoint DIR -p P -n N
--nproc K [--pp S]`` (or under torchrun). Every rank runs the same tests on its part of the
model (the layout of ``logits --nproc``, docs/distributed.md); rank 0 prints the table and
writes the JSON.

* Times: rank 0's clock. The ranks advance in lockstep (every step has its collectives), so
  rank 0's step time is the step time of the group.
* Bytes per decoded token / per step (the ``B/step`` column, ``bytes_per_token``): the
  **total over all ranks**, i.e. the sum of each rank's reads counted from its own prepared
  weights (:func:`rank_read_bytes`: its stage's layers,
  the replicated dense part once per rank that holds it, its share ``local / E`` of the
  ``k`` routed experts a token picks). The per-rank figures are printed and kept in the
  JSON (``ranks.bytes_per_token_per_rank``).
* % roofline: the total bytes per step x steps/s against the DRAM bandwidth rank 0 probed:
  right for local ranks sharing one host's memory; over several hosts compare each rank's
  bytes with its host's bandwidth instead.
* DRAM probe (and the INT8 peak): rank 0 only, before and after the tests, while the others
  wait in a store barrier (:meth:`RankGroup.meet`, no collective timeout) and then meet rank
  0 in one all-gather before the first test: the probe runs alone on the host (the others
  sleep) and no timed run contains the wait (every test also starts with its warm-up).
* Communication: per test, rank 0's bytes and seconds in the expert combine (all-gather)
  and the pipeline transfers during the timed runs only, per run; its share of the run
  time is the ``comm`` column (waiting for the other ranks included).
* Decode over ``K`` pipeline stages with ``b >= 4`` sequences (:func:`decode_steps`): the
  sequences form ``min(K, b // 2)`` groups whose steps stay in flight together (the
  engine's ``submit``), so stage ``s`` runs one group while stage ``s + 1`` runs another;
  every group still advances one token per step (t/s counts the same tokens).
"""

from __future__ import annotations

from typing import Any

__all__ = ["rank_entry", "run_ranks", "rank_read_bytes", "read_bytes", "combine_read_bytes", "comm_row", "ranks_report", "decode_steps"]


def decode_steps(eng, sids: list[int], toks: list[list[list[int]]]) -> None:
    """Run the decode steps ``toks`` (per step, one token list per sequence of ``sids``):
    one ``step`` over every sequence each time, or, on a pipeline stage (``eng.pipe``,
    ``stages`` > 1) with at least 4 sequences, ``min(stages, len(sids) // 2)`` sequence
    groups of at least 2 whose steps are kept in flight together (``eng.submit``, oldest
    result collected before a group's next step). Groups of one sequence lost on one host
    (Flash dims, 2 stages: b = 2 in flight 1.17x the step time, b = 4 0.90x;
    docs/distributed.md, "Schedule"). Every rank must run the same calls."""
    import collections

    pipe = getattr(eng, "pipe", None)
    groups = min(getattr(pipe, "stages", 1), len(sids) // 2) if pipe is not None else 1
    if groups < 2:
        for step_toks in toks:
            eng.step(sids, step_toks, chunk_tokens=0)
        return
    members = [list(range(len(sids)))[g::groups] for g in range(groups)]
    pending: collections.deque = collections.deque()
    for step_toks in toks:
        for m in members:
            if len(pending) == groups:
                pending.popleft().result()
            pending.append(eng.submit([sids[b] for b in m], [step_toks[b] for b in m]))
    while pending:
        pending.popleft().result()


def rank_entry(args, argv: list[str]):
    """Where this ``bench`` process stands (:func:`llm_kernels.cli_ranks.rank_entry`): None
    (one process), an int (the exit code of the ``--nproc`` local ranks it ran) or ``(rank,
    world_size)``; sets ``args.threads`` to the per-rank default (CPUs / local ranks) when
    not given over ranks. Raises SystemExit for bad ``--nproc`` / ``--pp`` / layouts."""
    from ..cli_ranks import rank_entry as entry

    args.raw_argv = ["bench", *argv]  # each rank runs the same command line
    where = entry(args)
    if isinstance(where, tuple) and args.threads is None:
        from ..distributed.runner import default_threads

        args.threads = default_threads()
    return where


def run_ranks(args, where: tuple[int, int], settings: dict, bench) -> int:
    """Run ``bench(ctx)`` as rank ``where[0]`` of ``where[1]`` (:func:`~llm_kernels.distributed.runner.run_rank`;
    ``settings``: what else every rank must agree on besides the options); stdout and the
    progress lines are rank 0's alone. Returns the exit code."""
    from ..cli_ranks import check_layout
    from ..distributed.commands import root_stdout
    from ..distributed.runner import run_rank

    rank, world = where
    layout = check_layout(args.checkpoint, world, args.pp, rank)  # before the rendezvous
    settings = {"command": "bench", "world": world, "pp": layout.pp, "reps": args.repetitions, "warmup": args.warmup,
                "threads": args.threads, "backend": args.backend, "quant": args.quant, "dtype": args.dtype,
                "tg_prompt": args.tg_prompt, "seed": args.seed, **settings}

    def body(ctx) -> int:
        if not ctx.is_root:
            args.quiet = True
        with root_stdout(ctx):
            return bench(ctx)

    return run_rank(body, rank=rank, world_size=world, timeout=args.ep_timeout, settings=settings,
                    checkpoint=args.checkpoint, layout=layout)


def rank_read_bytes(weights: dict, cfg) -> dict[str, Any]:
    """:func:`~.weight_bytes.decode_read_bytes` of this rank's part of the
    model (``weights``: the engine's prepared dict; a pipeline stage holds its layers only,
    remote experts are placeholders and count 0). Routed experts: the expected reads of
    this rank, i.e. each layer's mean local expert times the share of the layer's experts it
    holds (uniform routing: a token's ``k`` experts are on this rank ``k * local / E`` times
    on average), so that the sum over ranks is the bytes every rank together reads per
    token. Same keys as ``decode_read_bytes`` plus ``local_experts`` (per layer prefix)."""
    from ..distributed.expert_parallel import RemoteExpert
    from .weight_bytes import ROUTED_EXPERT, decode_read_bytes

    local = {k: w for k, w in weights.items() if not isinstance(w, RemoteExpert)}
    rb = decode_read_bytes(local, cfg)
    counts: dict[str, set[int]] = {}
    for name in local:
        m = ROUTED_EXPERT.match(name)
        if m is not None:
            counts.setdefault(m.group(1), set()).add(int(m.group(2)))
    E = rb["n_routed_experts"] or 1
    rb["local_experts"] = {p: len(s) for p, s in counts.items()}
    rb["expert_bytes"] = {p: v * len(counts[p]) / E for p, v in rb["expert_bytes"].items()}
    routed = sum(v * rb["experts_per_tok"] for v in rb["expert_bytes"].values()) if rb["expert_bytes"] else 0
    rb["per_token"] = int(round(rb["dense"] + rb["per_seq_rows"] + routed))
    rb["routed_per_token"] = int(round(routed))
    return rb


def read_bytes(ctx, prepared: dict, cfg) -> dict[str, Any]:
    """Bytes per decoded token of the model: :func:`~.weight_bytes.decode_read_bytes` in one
    process (``ctx`` None); over ranks the total of every rank's :func:`rank_read_bytes`
    (gathered: every rank calls this), with the per-rank dicts under ``"per_rank"``."""
    from .weight_bytes import decode_read_bytes

    if ctx is None:
        return decode_read_bytes(prepared, cfg)
    from ..distributed.commands import gather_json

    per_rank = gather_json(ctx, rank_read_bytes(prepared, cfg), "gathering the bytes per token")
    return dict(combine_read_bytes(per_rank), per_rank=per_rank)


def combine_read_bytes(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum over ranks of :func:`rank_read_bytes`
    breakdowns, shaped like :func:`~.weight_bytes.decode_read_bytes` so that
    :func:`~.weight_bytes.bytes_per_step` gives the bytes every rank together reads per step
    (``expert_bytes`` summed per layer prefix: each rank's expected share)."""
    out: dict[str, Any] = {k: per_rank[0][k] for k in ("experts_per_tok", "n_routed_experts", "tied_head")}
    for k in ("per_token", "dense", "vectors", "per_seq_rows", "routed_per_token", "total_storage", "params"):
        out[k] = sum(r[k] for r in per_rank)
    eb: dict[str, float] = {}
    for r in per_rank:
        for p, v in r["expert_bytes"].items():
            eb[p] = eb.get(p, 0.0) + v
    out["expert_bytes"] = eb
    out["experts_per_tok"] = next((r["experts_per_tok"] for r in per_rank if r["experts_per_tok"]), None)
    out["n_routed_experts"] = next((r["n_routed_experts"] for r in per_rank if r["n_routed_experts"]), None)
    return out


def comm_row(c: dict[str, float], reps: int, run_s: list[float]) -> dict[str, float]:
    """Per timed run: the :class:`~llm_kernels.distributed.commands.CommMeter` sums ``c``
    over ``reps`` runs divided by ``reps``, plus ``share`` (communication seconds / mean run
    seconds)."""
    per = {k: v / reps for k, v in c.items()}
    mean = sum(run_s) / len(run_s) if run_s else 0.0
    per["share"] = (per["ep_s"] + per["pipe_s"]) / mean if mean > 0 else 0.0
    return per


def ranks_report(ctx, threads: int, per_rank: list[dict[str, Any]], memory: list[str],
                 results: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Rank 0's extra lines under the table and the JSON ``ranks`` block."""
    from .core import fmt_bytes

    lay = ctx.layout
    lines = [f"ranks: {lay.describe()}; {threads} thread(s) per rank; times are rank 0's (the ranks run in "
             "lockstep)",
             "B/step and bytes per token are the TOTAL over all ranks (each rank's reads of its own weights: "
             "its stage's layers, the replicated dense part on every rank of a stage, its share of the routed "
             "experts); % roofline = that total x steps/s / the DRAM bandwidth probed by rank 0 (local ranks "
             "share this host's DRAM)",
             "weights read per decoded token per rank: " + ", ".join(
                 f"rank {r}: {fmt_bytes(b['per_token'])}" for r, b in enumerate(per_rank))]
    if lay.pp > 1:
        lines.append(f"decode with b >= 4 over {lay.pp} stages: min({lay.pp}, b // 2) sequence groups in flight "
                     "(engine.submit: stage s runs one group while stage s + 1 runs another)")
    lines += [f"  {m}" for m in memory]
    for row in results:
        c = row.get("comm")
        if not c:
            continue
        from ..distributed.commands import comm_parts

        parts = comm_parts(c)
        lines.append(f"communication {row['test']} (rank 0, per timed run, waiting included): "
                     + ("; ".join(parts) or "none") + f" = {c['share']:.1%} of the run")
    block = {"world_size": lay.world_size, "pp": lay.pp, "ep": lay.ep, "layout": lay.describe(),
             "threads_per_rank": threads, "bytes_per_token_per_rank": [b["per_token"] for b in per_rank],
             "bytes_breakdown_per_rank": per_rank, "memory": memory,
             "bytes_rule": "bytes_per_token, weight_bytes_per_step and pct_roofline: the total over all ranks "
                           "(sum of each rank's reads of its own weights; routed experts: the rank's expected "
                           "share local/E of the k a token picks); roofline bandwidth: rank 0's probe",
             "timing": "rank 0's clock; DRAM probe and INT8 peak on rank 0 only while the others wait"}
    return lines, block
