"""MTP speculative decoding: paired tok/s against plain decoding, and the step costs of its
cost model (docs/speculative.md).

One ``LLM`` (``speculative="mtp"``: the checkpoint's MTP block loaded) runs greedy decoding
of ``-n`` tokens for ``b`` random 8-token prompts, alternating plain and speculative runs
(A, B, B, A, ...: both see the same state of this guest's bimodal DRAM bandwidth); the two
must give the same ids (asserted). The engine's ``step`` and ``draft`` calls are timed:

* ``t1``: a plain decode step (1 row per sequence);
* ``tv``: a verify step (2 rows per sequence: next token + draft);
* ``td``: the MTP draft (the block over the step's kept rows, its head on the last row).

A step of speculative decoding costs ``tv + td`` and yields ``1 + a`` tokens per sequence
(``a``: acceptance rate), so the speed-up is ``(1 + a) · t1 / (tv + td)`` and the break-even
acceptance ``a* = (tv + td) / t1 - 1``. Random weights accept almost nothing (``a`` ~ 0):
the run measures the costs; the speed-up at a given acceptance follows from them.

The byte model beside them counts the weights each call reads (:mod:`.weight_bytes`, from
the prepared weights): the dense part once, and per MoE layer the expected number of
distinct routed experts of ``r`` uniformly routed tokens, ``E · (1 - (1 - k/E)^r)`` (``r =
b`` for a plain step, ``2b`` for a verify step; the draft: the MTP block's own layer and
experts plus the shared head, ``r = b``).

Two drafts per step (``draft_tokens = 2``: the MTP block re-applied) are not implemented;
their cost is measured: :func:`rows_cost` alternates main-model steps of 1, 2 and 3 rows
per sequence in one engine state (rewinding the extra rows), and :func:`k2_break_even`
gives the acceptance at which ``1 + a + a²`` tokens per ``tv2 + 2·td`` pay.

Run (the ``bench`` command's speculative mode)::

    python -m llm_kernels bench --checkpoint /tmp/flash3_mtp --speculative mtp --quant int8 -n 64 -b 1,4 -r 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ..api import LLM
from ..kernels.common.jit import dispatch_tier
from ..text.sampling import SamplingParams
from .core import measure_dram_bandwidth
from .weight_bytes import decode_read_bytes

__all__ = ["run", "main"]


def _timed(eng, log: dict):
    """Wrap ``eng.step`` / ``eng.draft`` to log (rows per sequence, seconds)."""
    step, draft = eng.step, eng.draft

    def timed_step(seq_ids, tokens, logits_rows="all", **kw):  # kw: chunk_tokens, on_chunk
        t = time.perf_counter()
        out = step(seq_ids, tokens, logits_rows=logits_rows, **kw)
        log["step"].append((max(len(x) for x in tokens), min(len(x) for x in tokens), time.perf_counter() - t))
        return out

    def timed_draft(seq_ids, hidden, next_ids):
        t = time.perf_counter()
        out = draft(seq_ids, hidden, next_ids)
        log["draft"].append((len(seq_ids), max(len(n) for n in next_ids), time.perf_counter() - t))
        return out

    eng.step, eng.draft = timed_step, timed_draft


def byte_model(w: dict, cfg, batch: int, rows_per_seq: int = 2) -> dict[str, float]:
    """Weight bytes of a plain step, a verify step (``rows_per_seq`` rows per sequence: 2
    for one draft) and a draft for ``batch`` sequences (see the module docstring) and their
    ratios."""
    def step(rb, rows):
        k, e = rb["experts_per_tok"], rb["n_routed_experts"]
        d = e * (1 - (1 - k / e) ** rows) if e else 0.0
        return rb["dense"] + rows * rb["per_seq_rows"] + sum(v * d for v in rb["expert_bytes"].values())

    main = decode_read_bytes({n: x for n, x in w.items() if not n.startswith("mtp.")}, cfg)
    mtp = decode_read_bytes({n: x for n, x in w.items() if n.startswith("mtp.") or n == "head.weight"}, cfg)
    t1, tv, td = step(main, batch), step(main, rows_per_seq * batch), step(mtp, batch)
    return {"bytes_t1": t1, "bytes_tv": tv, "bytes_td": td, "bytes_tv_over_t1": tv / t1, "bytes_td_over_t1": td / t1}


def rows_cost(eng, prompts: list[list[int]], rounds: int, seed: int) -> dict[int, float]:
    """Median seconds of a main-model step of 1, 2 and 3 rows per sequence (2: a verify
    step with one draft; 3: with two, ``draft_tokens = 2``), alternated in the same engine
    state: each multi-row step is journaled and rewound to its first row, so every step
    sees the same cache. Returns {rows: seconds}."""
    g = torch.Generator().manual_seed(seed)
    sids = [eng.add_sequence() for _ in prompts]
    try:
        eng.step(sids, prompts, logits_rows="last")
        times: dict[int, list[float]] = {1: [], 2: [], 3: []}
        order = (1, 2, 3)
        for r in range(rounds + 1):  # round 0: warm-up of the 3-row shapes
            for rows in (order if r % 2 == 0 else order[::-1]):
                toks = [torch.randint(0, eng.cfg.vocab_size, (rows,), generator=g).tolist() for _ in sids]
                eng.journaling = rows > 1
                t = time.perf_counter()
                eng.step(sids, toks)
                dt = time.perf_counter() - t
                eng.journaling = False
                if rows > 1:
                    for sid in sids:
                        eng.rewind(sid, 1)
                if r:
                    times[rows].append(dt)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        eng.journaling = False
        for sid in sids:
            eng.release(sid)


def k2_break_even(t1: float, tv2: float, td: float) -> float:
    """Acceptance ``a`` at which two drafts per step (tokens ``1 + a + a²``, cost
    ``tv2 + 2·td``) match plain decoding: the root of ``a² + a + 1 = (tv2 + 2·td) / t1``
    (nan above 1: never pays)."""
    c = (tv2 + 2 * td) / t1
    a = (-1 + (4 * c - 3) ** 0.5) / 2 if c >= 0.75 else 0.0
    return a if a <= 1 else float("nan")


def run(ckpt: str, quant: str | None, n: int, batch: int, reps: int, seed: int) -> dict:
    """Paired plain / speculative greedy runs of ``n`` tokens for ``batch`` random prompts,
    ``reps`` times each; returns the medians and the cost-model terms (module docstring).
    Raises AssertionError when the two give different ids."""
    rounds = max(4, 2 * reps)  # of rows_cost: each round keeps 3 rows per sequence
    llm = LLM(ckpt, quant=quant, speculative="mtp", max_batch=batch,
              max_seq_len=8 + max(n, 3 * (rounds + 1)) + 8)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, llm.cfg.vocab_size, (8,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    log = {"step": [], "draft": []}
    step0, draft0 = llm.engine.step, llm.engine.draft
    _timed(llm.engine, log)

    def once(mode):
        llm.speculative = mode
        return llm.generate(prompts, params)

    ref = [o.token_ids for o in once(None)]  # warm-up (kernel compile / cache load) and the reference ids
    once("mtp")
    res = {None: [], "mtp": []}
    plain_steps, verify_steps, drafts = [], [], []
    for r in range(reps):
        for mode in ((None, "mtp") if r % 2 == 0 else ("mtp", None)):
            log["step"].clear(), log["draft"].clear()
            out = once(mode)
            assert [o.token_ids for o in out] == ref, f"{mode or 'plain'} run {r}: ids differ from plain greedy"
            res[mode].append(batch * (n - 1) / max(o.timings["decode_s"] for o in out))
            if mode is None:
                plain_steps += [s for rows, lo, s in log["step"] if rows == 1]
            else:
                verify_steps += [s for rows, lo, s in log["step"] if rows == 2 and lo == 2]
                drafts += [s for b, rows, s in log["draft"] if b == batch and rows <= 2]
                acc = [o.timings for o in out]
    ratios = [b / a for a, b in zip(res[None], res["mtp"])]
    t1, tv, td = (statistics.median(x) * 1e3 if x else float("nan") for x in (plain_steps, verify_steps, drafts))
    llm.engine.step, llm.engine.draft = step0, draft0
    rc = rows_cost(llm.engine, prompts, rounds, seed + 1)
    bm3 = byte_model(llm.engine.w, llm.cfg, batch, rows_per_seq=3)
    return {"batch": batch, "plain_tok_s": statistics.median(res[None]), "spec_tok_s": statistics.median(res["mtp"]),
            "paired_ratio": statistics.median(ratios),
            "acceptance": statistics.mean(t["acceptance_rate"] for t in acc),
            "tokens_per_step": statistics.mean(t["tokens_per_step"] for t in acc),
            "t1_ms": t1, "tv_ms": tv, "td_ms": td, "tv_over_t1": tv / t1, "td_over_t1": td / t1,
            "break_even_acceptance": (tv + td) / t1 - 1,
            "samples": {"t1": len(plain_steps), "tv": len(verify_steps), "td": len(drafts)},
            "k2": {"step_ms": {str(k): v * 1e3 for k, v in rc.items()}, "tv2_over_t1": rc[3] / rc[1],
                   "tv_over_t1": rc[2] / rc[1], "bytes_tv2_over_t1": bm3["bytes_tv_over_t1"],
                   "break_even_acceptance": k2_break_even(rc[1], rc[3], td / t1 * rc[1])},
            **byte_model(llm.engine.w, llm.cfg, batch)}


def main(argv: list[str] | None = None) -> int:
    """``bench --speculative mtp``: prints a markdown table (and writes ``--json``); returns 0."""
    ap = argparse.ArgumentParser(prog="python -m llm_kernels bench --speculative mtp",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", "--checkpoint", dest="checkpoint", required=True, metavar="DIR",
                    help="a DeepSeek-V4 checkpoint with an MTP block (make-checkpoint --mtp-layers 1)")
    ap.add_argument("--speculative", choices=["mtp"], required=True)
    ap.add_argument("--quant", default="int8", help="as `generate --quant` (default int8)")
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="tokens per run (default 64)")
    ap.add_argument("-b", "--batch-size", default="1,4", help="batch sizes (default 1,4)")
    ap.add_argument("-r", "--repetitions", type=int, default=5, help="paired runs (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="result file")
    a = ap.parse_args(argv)
    quant = None if a.quant in ("", "as-stored") else a.quant
    bw0 = measure_dram_bandwidth()
    rows = [run(a.checkpoint, quant, a.n_gen, int(b), a.repetitions, a.seed) for b in a.batch_size.split(",")]
    bw1 = measure_dram_bandwidth()
    print(f"CPU tier {dispatch_tier()}, threads {torch.get_num_threads()}, DRAM read {bw0:.1f} / {bw1:.1f} GB/s "
          f"(before / after), checkpoint {a.checkpoint}, quant {a.quant}, n {a.n_gen}, {a.repetitions} paired runs")
    print("| b | plain t/s | spec t/s | paired ratio | acceptance | tok/step | t1 ms | tv ms | tv/t1 | td ms "
          "| td/t1 | break-even a* | bytes tv/t1 | bytes td/t1 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['plain_tok_s']:.2f} | {r['spec_tok_s']:.2f} | {r['paired_ratio']:.3f} | "
              f"{r['acceptance']:.3f} | {r['tokens_per_step']:.3f} | {r['t1_ms']:.1f} | {r['tv_ms']:.1f} | "
              f"{r['tv_over_t1']:.3f} | {r['td_ms']:.1f} | {r['td_over_t1']:.3f} | {r['break_even_acceptance']:.3f} | "
              f"{r['bytes_tv_over_t1']:.3f} | {r['bytes_td_over_t1']:.3f} |")
    print("\nTwo drafts per step (draft_tokens = 2, not implemented; its cost measured): main-model steps of "
          "1 / 2 / 3 rows per sequence alternated in one engine state, medians")
    print("| b | t1 ms | 2-row ms | 3-row ms | tv2/t1 | bytes tv2/t1 | k=2 break-even a* |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        k = r["k2"]
        print(f"| {r['batch']} | {k['step_ms']['1']:.1f} | {k['step_ms']['2']:.1f} | {k['step_ms']['3']:.1f} | "
              f"{k['tv2_over_t1']:.3f} | {k['bytes_tv2_over_t1']:.3f} | {k['break_even_acceptance']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tier": dispatch_tier(), "bandwidth_gbs": [bw0, bw1], "rows": rows}, f, indent=1)
    return 0
