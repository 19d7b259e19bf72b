"""The server against its own engine, in one process: decode throughput with 1 and 8
concurrent streams through HTTP, and the server's overhead over the bare engine.

    python benchmarks/bench_serve_overhead.py --checkpoint DIR [--quant int8] [--backend fused]
        [--rounds 3] [--prompt-tokens 32] [--max-tokens 64] [--json PATH]

``DIR`` needs the tokenizer files (``make-checkpoint`` writes them; for an older checkpoint,
a folder of symlinks to its ``config.json`` / safetensors plus
``checkpoint.random_tokenizer.write_random_tokenizer(dir, vocab_size)``).

One load (:func:`llm_kernels.serve.launch.load_server`, cache for 8 sequences), then per
round, interleaved so that a busy neighbour hits every arm alike:

* **engine**: the bare engine, no server: ``B`` sequences (1, then 8) with random
  ``--prompt-tokens`` prompts, each prefilled alone, then ``--max-tokens - 1`` decode steps of
  all ``B`` at once, greedy (``argmax``): the time inside ``engine.step`` only (no sampling)
  per decode step, and decode tok/s from it;
* **server**: uvicorn serving the same engine on 127.0.0.1 in this process (as ``serve``
  runs it), driven by ``python -m llm_kernels bench-serve`` in a child process with
  concurrency 1, then 8 (``--requests`` per client): inter-token latency p50 (the steady
  decode period), decode tok/s (concurrency / mean inter-token gap), output tok/s, and from
  ``/stats`` the engine ms per decode step and the scheduler loop's share.

Reported (medians over rounds): the 8-vs-1 decode throughput ratio through the server, and
the server's overhead at 8 streams = server ITL p50 / bare engine decode step - 1 (HTTP,
scheduling, sampling, detokenization and hand-off together; the child client also takes CPU
from the 2 cores), and its two parts measured directly from ``/stats``: the scheduler loop
(its time / engine time; serial with the steps) and the HTTP thread's CPU time / engine
time (beside the steps, competing for the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))


def engine_decode(engine, batch: int, prompt_tokens: int, max_tokens: int, vocab: int, seed: int) -> dict:
    """The bare engine: prefill each prompt alone, then ``max_tokens - 1`` batched greedy decode steps."""
    rng = random.Random(seed)
    sids = [engine.add_sequence() for _ in range(batch)]
    try:
        nxt = []
        for s in sids:
            (lg,) = engine.step([s], [[rng.randrange(3, vocab) for _ in range(prompt_tokens)]], logits_rows="last")
            nxt.append(int(lg[-1].argmax()))
        steps = max_tokens - 1
        dt = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            out = engine.step(sids, [[t] for t in nxt], logits_rows="last")
            dt += time.perf_counter() - t0  # the engine step alone, no sampling
            nxt = [int(np.argmax(lg[-1].numpy())) for lg in out]
    finally:
        for s in sids:
            engine.release(s)
    return {"batch": batch, "decode_ms_per_step": dt / steps * 1e3, "decode_tok_s": batch * steps / dt}


def server_round(url: str, concurrency: int, requests: int, prompt_tokens: int, max_tokens: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "bs.json"
        subprocess.run([sys.executable, "-m", "llm_kernels", "bench-serve", "--url", url, "--concurrency",
                        str(concurrency), "--requests", str(requests), "--prompt-tokens", str(prompt_tokens),
                        "--max-tokens", str(max_tokens), "--seed", str(seed), "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["runs"][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--quant", default="int8")
    p.add_argument("--backend", default="fused")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2, help="requests per client per server run")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=Path("bench_serve_overhead.json"))
    args = p.parse_args(argv)

    from llm_kernels.kernels.common.jit import dispatch_tier
    from llm_kernels.serve.launch import load_server
    from serve_helpers import run_uvicorn

    app, engine, tok, cfg = load_server(args.checkpoint, backend=args.backend, quant=args.quant, max_batch=8,
                                        max_queue=64, max_seq_len=max(256, args.prompt_tokens + args.max_tokens + 8))
    vocab = cfg.info["vocab_size"]
    print(f"{cfg.info['model']}; backend {args.backend}, quant {args.quant}, tier {dispatch_tier()}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    rounds = []
    with run_uvicorn(app) as url:
        for b in (1, 8):  # warm-up, not timed: first-call costs of every shape, the client's imports
            engine_decode(engine, b, args.prompt_tokens, 4, vocab, seed=99)
            server_round(url, b, 1, args.prompt_tokens, 4, 99)
        for r in range(args.rounds):
            row = {"load_average": os.getloadavg()[0]}
            for b in (1, 8):
                row[f"engine_b{b}"] = engine_decode(engine, b, args.prompt_tokens, args.max_tokens, vocab, seed=r)
                row[f"server_c{b}"] = server_round(url, b, args.requests, args.prompt_tokens, args.max_tokens, r)
            e1, e8, s1, s8 = row["engine_b1"], row["engine_b8"], row["server_c1"], row["server_c8"]
            row["scaling_8_vs_1"] = s8["decode_tok_s_est"] / s1["decode_tok_s_est"]
            row["overhead_c8"] = s8["itl_ms"]["p50"] / e8["decode_ms_per_step"] - 1
            row["overhead_c1"] = s1["itl_ms"]["p50"] / e1["decode_ms_per_step"] - 1
            row["loop_share_c8"] = s8["server"]["loop_share_of_engine"]
            row["http_cpu_share_c8"] = s8["server"].get("http_cpu_share_of_engine", float("nan"))
            rounds.append(row)
            print(f"round {r} (load {row['load_average']:.2f}): engine b1 {e1['decode_ms_per_step']:.2f} ms/step "
                  f"({e1['decode_tok_s']:.1f} tok/s), b8 {e8['decode_ms_per_step']:.2f} ms/step "
                  f"({e8['decode_tok_s']:.1f} tok/s) | server c1 ITL p50 {s1['itl_ms']['p50']:.2f} ms "
                  f"(decode {s1['decode_tok_s_est']:.1f} tok/s, output {s1['output_tok_s']:.1f}), c8 ITL p50 "
                  f"{s8['itl_ms']['p50']:.2f} ms (decode {s8['decode_tok_s_est']:.1f} tok/s, output "
                  f"{s8['output_tok_s']:.1f}), TTFT p50 c8 {s8['ttft_ms']['p50']:.1f} ms | 8 vs 1 "
                  f"{row['scaling_8_vs_1']:.2f}x, overhead c8 {row['overhead_c8']:+.1%} (c1 {row['overhead_c1']:+.1%}), "
                  f"loop {row['loop_share_c8']:.2%}, HTTP thread CPU {row['http_cpu_share_c8']:.2%} of engine",
                  flush=True)
    med = {k: statistics.median(r[k] for r in rounds)
           for k in ("scaling_8_vs_1", "overhead_c8", "overhead_c1", "loop_share_c8", "http_cpu_share_c8")}
    med.update({f"{k}_{f}": statistics.median(r[k][f] for r in rounds)
                for k, f in (("engine_b1", "decode_tok_s"), ("engine_b8", "decode_tok_s"),
                             ("engine_b8", "decode_ms_per_step"), ("server_c1", "decode_tok_s_est"),
                             ("server_c8", "decode_tok_s_est"), ("server_c1", "output_tok_s"),
                             ("server_c8", "output_tok_s"))})
    med["server_c8_itl_p50_ms"] = statistics.median(r["server_c8"]["itl_ms"]["p50"] for r in rounds)
    med["server_c8_ttft_p50_ms"] = statistics.median(r["server_c8"]["ttft_ms"]["p50"] for r in rounds)
    print("medians: " + ", ".join(f"{k} {v:.4g}" for k, v in med.items()))
    args.json.write_text(json.dumps({"model": cfg.info, "tier": dispatch_tier(), "args": {k: str(v) for k, v in
                                     vars(args).items()}, "rounds": rounds, "medians": med}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
