"""A model on paper: expert-parallel decode tok/s of an MoE preset at N hosts, from bytes.

::

    python -m llm_kernels.distributed.predict --preset flash --hosts 8,16,32 --ram-gb 24,64,256 \\
        --dram-gbs 45 --link-gbps 10,25 --latency-us 30 [--batch 1,4] [--quant int8]

Per decode step of ``B`` sequences (``T = B`` tokens), with the design of
:mod:`.expert_parallel` (dense part replicated, experts sharded, one all-gather per layer):

* **bytes a rank reads**: every non-expert weight once (the embedding only its ``T`` rows)
  plus its share of the active experts: ``E/N · (1 - (1 - K/E)^T)`` distinct experts per
  layer on average (uniform routing), each ``3 · I · D`` weights; weights at the scheme's
  sizes (the spec's ``quantized_weight(scheme)``: 1 byte + a float32 scale per row;
  float32 tensors 4 bytes, integer tables 8; the rest bf16);
* **compute** = bytes / ``--dram-gbs`` (a rank's effective weight-streaming bandwidth;
  the kernels reach 43-46 GB/s for W8A8 GEMMs on the 2-core reference box, see
  ``kernels/deepseek_v4/moe.py``);
* **combine** per layer, a ring all-gather: ``(N - 1) · (latency + s / link)`` with ``s = 16
  + n_max · D · 2`` bytes, ``n_max`` the expected largest route count of a rank (sampled:
  each token picks ``K`` distinct experts uniformly);
* **tok/s** = ``T / (compute + L · combine)``; **memory per rank** = all non-expert weights
  + ``E/N`` experts per layer + 1 GiB of runtime (the KV cache comes on top): hosts where it
  does not fit RAM are marked.

With ``--pp K`` (:func:`predict_pp`): ``K`` pipeline stages of ``N / K`` expert shards; a
rank holds its stage's layers (dense part and ``E / (N/K)`` experts each) plus the
embedding (first stage) or head (last); the stages run in turn, so a step costs the sum of
the stages' reads and combines plus the hidden-row hops and the logits broadcast.

Not modelled: the ranks' imbalance (a step waits for the busiest rank), attention's KV
reads (small at short contexts), compute-bound prefill, ranks sharing one host's DRAM.
``docs/distributed.md`` compares it with the measured runs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

import numpy as np

__all__ = ["ByteModel", "byte_model", "predict", "predict_pp", "main"]

_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")
GIB = 2.0 ** 30


class ByteModel:
    """Bytes of a config at a quant scheme: ``dense`` (all non-expert weights), ``dense_step``
    (what one decode step reads of them, without the embedding table), ``expert`` (one
    routed expert of one layer), ``layer_dense`` (a decoder layer's non-expert weights,
    mean over layers), ``head`` (the last pipeline stage's: head, final norm, hc_head, MTP),
    ``embed`` (the table), ``hidden_row`` (bytes of one token's hidden rows between pipeline
    stages, float32) and the dims ``D``, ``L``, ``E``, ``K``, ``V``."""

    def __init__(self, dense: float, dense_step: float, embed_row: float, expert: float, D: int, L: int, E: int,
                 K: int, layer_dense: float = 0.0, head: float = 0.0, embed: float = 0.0, hidden_row: float = 0.0,
                 V: int = 0):
        self.dense, self.dense_step, self.embed_row, self.expert = dense, dense_step, embed_row, expert
        self.D, self.L, self.E, self.K = D, L, E, K
        self.layer_dense, self.head, self.embed, self.hidden_row, self.V = layer_dense, head, embed, hidden_row, V


def byte_model(cfg, scheme: str) -> ByteModel:
    """:class:`ByteModel` of ``cfg`` (any registered MoE model: ``n_routed_experts``,
    ``num_experts_per_tok``) at ``scheme`` ("w8a8", "int8" or "none" = bf16). Raises
    ValueError for another scheme or a model without routed experts."""
    from .. import models

    spec = models.spec_for_config(cfg)
    if scheme not in ("w8a8", "int8", "none"):
        raise ValueError(f"--quant must be w8a8, int8 or none, got {scheme!r}")
    E = int(getattr(cfg, "n_routed_experts", 0) or 0)
    if not E:
        raise ValueError("the model has no routed experts (n_routed_experts): nothing to shard")
    quantized = spec.quantized_weight(scheme) if scheme != "none" else (lambda name: False)
    dense = dense_step = embed_row = layers = head = embed = 0.0
    part = spec.pipeline_part or (lambda name, cfg: None)
    experts: dict[str, float] = {}
    for name, info in spec.expected_float_tensors(cfg).items():
        shape = tuple(info.shape)
        n = math.prod(shape)
        if getattr(info, "kind", "float") == "int":  # hash-routing table, int64 as loaded
            b = 8 * n
        elif quantized(name) and len(shape) == 2:
            b = n + 4 * shape[0]
        elif spec.is_fp32_tensor(name):
            b = 4 * n
        else:
            b = 2 * n
        m = _EXPERT.search(name)
        if m is not None:
            experts[m.group(1)] = experts.get(m.group(1), 0.0) + b
            continue
        dense += b
        where = part(name, cfg)
        if isinstance(where, int):
            layers += b
        elif where == "head":
            head += b
        elif where in ("embed", "embed_head"):
            embed += b
        if name == "embed.weight":
            embed_row = b / shape[0]
        else:
            dense_step += b
    L = int(cfg.num_hidden_layers)
    per_expert_layer = sum(experts.values()) / (E * L)
    hidden_row = 4 * int(getattr(cfg, "hc_mult", 1) or 1) * int(cfg.hidden_size)
    return ByteModel(dense, dense_step, embed_row, per_expert_layer, int(cfg.hidden_size), L, E,
                     int(cfg.num_experts_per_tok), layer_dense=layers / L, head=head, embed=embed,
                     hidden_row=hidden_row, V=int(cfg.vocab_size))


def max_routes(T: int, K: int, E: int, N: int, samples: int = 2000, seed: int = 0) -> float:
    """Expected largest number of a step's ``T·K`` routes that one of ``N`` ranks owns
    (uniform routing, ``K`` distinct experts per token, expert ``e`` on rank ``e // (E/N)``)."""
    rng = np.random.default_rng(seed)
    per = E // N
    tot = 0.0
    for _ in range(samples):
        owners = np.concatenate([rng.choice(E, K, replace=False) for _ in range(T)]) // per
        tot += np.bincount(owners, minlength=N).max()
    return tot / samples


def predict(bm: ByteModel, N: int, T: int, dram_gbs: float, link_gbps: float, latency_us: float) -> dict:
    """One row: ``bytes_read`` per rank and step, ``compute_ms``, ``comm_ms`` (all layers),
    ``tok_s``, ``mem_gib`` per rank, ``comm_bytes`` a rank sends per step."""
    active = bm.E / N * (1 - (1 - bm.K / bm.E) ** T)
    read = bm.dense_step + T * bm.embed_row + bm.L * active * bm.expert
    compute = read / (dram_gbs * 1e9)
    s = 16 + (max_routes(T, bm.K, bm.E, N) if N > 1 else 0) * bm.D * 2
    comm = (N - 1) * (latency_us * 1e-6 + s * 8 / (link_gbps * 1e9)) * bm.L
    mem = bm.dense + bm.E / N * bm.L * bm.expert + GIB
    return dict(bytes_read=read, compute_ms=compute * 1e3, comm_ms=comm * 1e3, tok_s=T / (compute + comm),
                mem_gib=mem / GIB, comm_bytes=s * bm.L if N > 1 else 0)


def predict_pp(bm: ByteModel, N: int, pp: int, T: int, dram_gbs: float, link_gbps: float,
               latency_us: float) -> dict:
    """One row for ``N`` hosts as ``pp`` pipeline stages x ``N / pp`` expert shards
    (:mod:`.layout`): the stages run in turn, so a step is the sum over stages of (the
    stage's reads / ``dram_gbs`` + its layers' combines), plus ``pp - 1`` hops of the
    ``T`` hidden rows and the logits broadcast (``T · V`` float32 over ``ceil(log2 N)``
    hops). Keys as :func:`predict` (``bytes_read`` and ``mem_gib``: the busiest rank's)."""
    from .layout import split_layers

    ep = N // pp
    active = bm.E / ep * (1 - (1 - bm.K / bm.E) ** T)
    s = 16 + (max_routes(T, bm.K, bm.E, ep) if ep > 1 else 0) * bm.D * 2
    combine = (ep - 1) * (latency_us * 1e-6 + s * 8 / (link_gbps * 1e9))
    step = comm = 0.0
    reads, mems = [], []
    for k, (a, b) in enumerate(split_layers(bm.L, pp)):
        n = b - a
        read = n * (bm.layer_dense + active * bm.expert)
        mem = n * (bm.layer_dense + bm.E / ep * bm.expert) + GIB
        if k == 0:
            read += T * bm.embed_row
            mem += bm.embed
        if k == pp - 1:
            read += bm.head
            mem += bm.head
        reads.append(read)
        mems.append(mem)
        step += read / (dram_gbs * 1e9) + n * combine
        comm += n * combine
    hop = lambda nbytes: latency_us * 1e-6 + nbytes * 8 / (link_gbps * 1e9)  # noqa: E731
    wire = (pp - 1) * hop(T * bm.hidden_row) + math.ceil(math.log2(N)) * hop(T * bm.V * 4) if N > 1 else 0.0
    step += wire
    return dict(bytes_read=max(reads), compute_ms=(step - comm - wire) * 1e3, comm_ms=(comm + wire) * 1e3,
                tok_s=T / step, mem_gib=max(mems) / GIB, comm_bytes=s * bm.L / pp if ep > 1 else 0)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """The table (see the module docstring); returns 0, or 2 for a bad option."""
    from ..models import preset

    p = argparse.ArgumentParser(prog="python -m llm_kernels.distributed.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash", help="an MoE preset (flash, pro, ...)")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--experts", type=int, default=None, help="routed experts")
    p.add_argument("--quant", default="int8", help="w8a8, int8 or none (bf16)")
    p.add_argument("--hosts", type=_ints, default=_ints("8,16,32,64"), help="ranks (one per host)")
    p.add_argument("--ram-gb", type=_floats, default=_floats("24,64,256"), help="host RAM sizes to mark fits")
    p.add_argument("--dram-gbs", type=float, default=45.0, help="weight-streaming bandwidth per host, GB/s")
    p.add_argument("--link-gbps", type=_floats, default=_floats("10,25"), help="link bandwidth, Gbit/s")
    p.add_argument("--latency-us", type=float, default=30.0, help="per-message latency of a link hop, us")
    p.add_argument("--batch", type=_ints, default=_ints("1"), help="sequences per decode step")
    p.add_argument("--pp", type=_ints, default=_ints("1"),
                   help="pipeline stages (each must divide the hosts; the rest shard the experts of a stage)")
    a = p.parse_args(argv)
    try:
        cfg = preset(a.preset, num_hidden_layers=a.layers, n_routed_experts=a.experts)
        bm = byte_model(cfg, a.quant)
        from .layout import RankLayout

        for N in a.hosts:
            for pp in a.pp:
                RankLayout(0, N, pp, bm.L, bm.E)  # ValueError: pp not dividing N, shards not dividing E, ...
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.summary()}, quant {a.quant}: non-expert weights {bm.dense / GIB:.2f} GiB "
          f"(read per step {bm.dense_step / GIB:.2f} GiB), one expert-layer {bm.expert / 2 ** 20:.1f} MiB, "
          f"experts in all {bm.E * bm.L * bm.expert / GIB:.1f} GiB; DRAM {a.dram_gbs:g} GB/s per host, "
          f"link latency {a.latency_us:g} us")
    print(f"{'hosts':>5} {'pp':>3} {'batch':>5} {'link':>8} {'GiB/rank':>9} {'fits':>12} {'read/step':>10} "
          f"{'compute':>9} {'comm':>9} {'sent/step':>10} {'tok/s':>8}")
    for N in a.hosts:
        for pp in a.pp:
            for T in a.batch:
                for link in a.link_gbps:
                    r = predict(bm, N, T, a.dram_gbs, link, a.latency_us) if pp == 1 else \
                        predict_pp(bm, N, pp, T, a.dram_gbs, link, a.latency_us)
                    fits = ",".join(f"{g:g}" for g in a.ram_gb if r["mem_gib"] * GIB <= g * 1e9) or "none"
                    print(f"{N:>5} {pp:>3} {T:>5} {link:>5g}Gb {r['mem_gib']:>9.1f} {fits + ' GB':>12} "
                          f"{r['bytes_read'] / GIB:>8.2f}Gi {r['compute_ms']:>7.1f}ms {r['comm_ms']:>7.2f}ms "
                          f"{r['comm_bytes'] / 1024:>8.0f}Ki {r['tok_s']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
