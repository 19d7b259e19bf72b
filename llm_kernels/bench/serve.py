"""``python -m llm_kernels bench-serve --url URL`` (or ``bench --serve URL``): load a running OpenAI-compatible server
(``python -m llm_kernels serve``) with N concurrent streaming clients and report, per
concurrency level,

* aggregate output tok/s (all clients' completion tokens / wall time of the level) and
  requests/s;
* time to first token (request sent -> first token chunk) and inter-token latency (gaps
  between a stream's successive tokens), p50 / p90 / p99, in ms;
* from the server's ``/stats`` (when it is an llm_kernels server): decode steps, mean
  running batch, engine ms per step, the scheduler loop's own time (sampling,
  detokenization, hand-off; serial with the steps) and the HTTP thread's CPU time (request
  parsing, tokenization, JSON/SSE; it runs beside the steps and competes for the cores),
  both as a share of the engine time.

Each client sends its requests one after another (a closed loop): ``--requests`` per
client per level. Prompts are token ids (``--prompt-tokens`` random ids, seeded), sent to
``/v1/completions`` with ``temperature 0``, ``ignore_eos`` and ``return_token_ids`` so every
request generates exactly ``--max-tokens`` tokens and every chunk is one token. The JSON
result (``--json``) holds every level's figures and the machine's load average at start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser", "run_level", "percentiles"]


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` of ``values`` (None when empty)."""
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


async def _one_request(client, url: str, body: dict) -> dict:
    """Stream one completion; returns send time, token arrival times and the token count."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    n_tok = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {r.status_code}: {text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error'].get('message')}")
            for c in chunk.get("choices", []):
                k = len(c.get("token_ids") or [])
                if k:
                    now = time.perf_counter()
                    stamps.extend([now] * k)
                    n_tok += k
    return {"t0": t0, "stamps": stamps, "tokens": n_tok}


async def _get_json(client, url: str) -> dict | None:
    try:
        r = await client.get(url)
        return r.json() if r.status_code == 200 else None
    except Exception:
        return None


async def run_level(url: str, model: str, concurrency: int, requests_per_client: int, prompt_tokens: int,
                    max_tokens: int, vocab: int, seed: int = 0, timeout: float = 600.0) -> dict:
    """One concurrency level: ``concurrency`` closed-loop clients, each sending
    ``requests_per_client`` streaming requests. Returns the level's figures (see module doc)."""
    import httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        s0 = await _get_json(client, url + "/stats")

        async def worker(w: int) -> list[dict]:
            out = []
            for _ in range(requests_per_client):
                body = {"model": model, "prompt": [rng.randrange(3, vocab) for _ in range(prompt_tokens)],
                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                        "return_token_ids": True}
                out.append(await _one_request(client, url, body))
            return out

        t_start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(w) for w in range(concurrency)]) for r in rs]
        wall = time.perf_counter() - t_start
        s1 = await _get_json(client, url + "/stats")
    ttft = [(r["stamps"][0] - r["t0"]) * 1e3 for r in results if r["stamps"]]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    level = {"concurrency": concurrency, "requests": len(results), "prompt_tokens": prompt_tokens,
             "max_tokens": max_tokens, "wall_s": wall, "output_tokens": tokens,
             "output_tok_s": tokens / wall, "requests_s": len(results) / wall,
             "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl),
             "per_stream_tok_s": percentiles([1e3 / x for x in itl if x > 0]),
             # steady decode: every stream advances one token per mean inter-token gap
             "decode_tok_s_est": concurrency * 1e3 / float(np.mean(itl)) if itl else None}
    if s0 and s1 and "decode_steps" in s0:
        keys = ("steps", "engine_s", "loop_s", "batch_sum", "tokens", "prefill_tokens", "decode_steps",
                "decode_engine_s", "decode_rows")
        d = {k: s1[k] - s0[k] for k in keys}
        steps, dsteps = max(d["steps"], 1), max(d["decode_steps"], 1)
        level["server"] = {
            "steps": d["steps"], "decode_steps": d["decode_steps"], "mean_batch": d["batch_sum"] / steps,
            "mean_decode_batch": d["decode_rows"] / dsteps,
            "engine_ms_per_step": d["engine_s"] / steps * 1e3,
            "engine_ms_per_decode_step": d["decode_engine_s"] / dsteps * 1e3,
            "loop_ms_per_step": d["loop_s"] / steps * 1e3, "loop_share_of_engine": d["loop_s"] / max(d["engine_s"], 1e-9),
            "wall_ms_per_step": wall / steps * 1e3, "engine_share_of_wall": d["engine_s"] / wall,
            "prefill_tokens": d["prefill_tokens"], "tokens": d["tokens"]}
        if s0.get("http_thread_cpu_s") is not None and s1.get("http_thread_cpu_s") is not None:
            http = s1["http_thread_cpu_s"] - s0["http_thread_cpu_s"]
            level["server"]["http_cpu_ms_per_step"] = http / steps * 1e3
            level["server"]["http_cpu_share_of_engine"] = http / max(d["engine_s"], 1e-9)
    return level


def build_parser() -> argparse.ArgumentParser:
    """The ``bench-serve`` flags."""
    p = argparse.ArgumentParser(prog="python -m llm_kernels bench-serve",
                                description="N concurrent streaming clients against a running server: aggregate "
                                            "tok/s, time to first token, inter-token latency p50/p90/p99")
    p.add_argument("--url", "--serve", dest="url", default="http://127.0.0.1:8000",
                   help="the server's base URL (with or without /v1); 'bench --serve URL' runs this benchmark too")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client counts (default 1,8)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="run every level this many times (rounds interleaved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench_serve.json"), help="result file (default ./bench_serve.json)")
    return p


def _check(args: argparse.Namespace) -> list[int]:
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"--concurrency must list integers >= 1, got {args.concurrency!r}")
    for name in ("requests", "prompt_tokens", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return levels


def _fmt(p: dict) -> str:
    return " / ".join("-" if v is None else f"{v:.1f}" for v in p.values())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table and writes ``--json``. Returns the exit code."""
    import httpx

    args = build_parser().parse_args(argv)
    try:
        levels = _check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    try:
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        stats = httpx.get(url + "/stats", timeout=10)
    except (httpx.HTTPError, KeyError, ValueError) as e:
        print(f"error: --url {args.url}: no OpenAI-compatible server answers there ({e})", file=sys.stderr)
        return 2
    model = args.model or models[0]["id"]
    info = stats.json() if stats.status_code == 200 else {}
    vocab = int(info.get("vocab_size") or 256)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"server {url}, model {model!r} ({info.get('model', '?')}, backend {info.get('backend', '?')}, "
          f"quant {info.get('quant', '?')}, tier {info.get('tier', '?')}), load average at start {load0}")
    runs: list[dict] = []
    for rep in range(args.repeats):
        for c in levels:
            lv = asyncio.run(run_level(url, model, c, args.requests, args.prompt_tokens, args.max_tokens, vocab,
                                       seed=args.seed + 1000 * rep + c))
            lv["repeat"] = rep
            runs.append(lv)
            srv = lv.get("server", {})
            extra = (f"; server: {srv['decode_steps']} decode steps of {srv['mean_decode_batch']:.2f} rows, engine "
                     f"{srv['engine_ms_per_decode_step']:.2f} ms/decode step, loop {srv['loop_share_of_engine']:.2%} "
                     f"of engine time, HTTP thread CPU {srv.get('http_cpu_share_of_engine', float('nan')):.2%} "
                     "of engine time") if srv else ""
            print(f"c={c:3d} rep {rep}: {lv['output_tok_s']:8.2f} tok/s (decode ~{lv['decode_tok_s_est'] or 0:.1f}; "
                  f"{lv['output_tokens']} tokens, "
                  f"{lv['requests']} requests, {lv['wall_s']:.1f} s); TTFT p50/p90/p99 {_fmt(lv['ttft_ms'])} ms; "
                  f"ITL {_fmt(lv['itl_ms'])} ms{extra}", flush=True)
    summary = {}
    for c in levels:
        rs = [r for r in runs if r["concurrency"] == c]
        summary[str(c)] = {"output_tok_s_median": float(np.median([r["output_tok_s"] for r in rs])),
                           "decode_tok_s_est_median": float(np.median([r["decode_tok_s_est"] or 0 for r in rs])),
                           "itl_p50_ms_median": float(np.median([r["itl_ms"]["p50"] for r in rs])),
                           "ttft_p50_ms_median": float(np.median([r["ttft_ms"]["p50"] for r in rs]))}
    if len(levels) > 1:
        base = summary[str(levels[0])]["output_tok_s_median"]
        for c in levels[1:]:
            summary[str(c)]["speedup_vs_" + str(levels[0])] = summary[str(c)]["output_tok_s_median"] / base
            print(f"aggregate tok/s at c={c} vs c={levels[0]} (medians): "
                  f"{summary[str(c)]['speedup_vs_' + str(levels[0])]:.2f}x")
    out = {"benchmark": "serve", "url": url, "model": model, "server_info": info, "load_average_start": load0,
           "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
