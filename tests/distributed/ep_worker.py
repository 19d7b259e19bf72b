"""Test worker: the logits of several (dtype, backend, quant) configurations on one process
group, so that the EP tests pay the start-up of N ranks once per N.

``python ep_worker.py <checkpoint> <out dir> <configs json> <inputs json> <decodes json>``

* without ``RANK`` / ``WORLD_SIZE`` (or ``WORLD_SIZE=1``): one process, the whole checkpoint;
* as a rank (launched by :func:`llm_kernels.distributed.spawn_local`): the expert-parallel
  path of the CLI (``RankContext.load`` / ``wrap``), rank 0 writing the files;
  ``EP_WORKER_PERTURB_RANK=r``: rank r scales its routing weights by 1 + 1e-7 (a replicated
  computation that diverged); ``EP_WORKER_PP=k``: k pipeline stages (each stage's experts
  sharded over its ranks; a dense model needs k = the ranks); ``EP_WORKER_GROUPS=g``: the
  decode steps of g sequence groups kept in flight together (``engine.submit``; equal
  decode lengths).

Writes ``<out dir>/<i>.safetensors`` per configuration ``i`` (``prefill.<b>`` /
``decode.<b>``) and ``<out dir>/<i>.stats.json`` (rank 0's combine records, with expert
shards) or ``<out dir>/<i>.pipe.json`` (rank 0's pipeline transfer bytes, with stages). One
thread per process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from llm_kernels.runtime.builder import DTYPES, build_engine, set_threads


def logits(engine, inputs, decodes) -> dict:
    sids, pre = engine.prefill(inputs)
    out = {f"prefill.{b}": pre[b].float().contiguous() for b in range(len(inputs))}
    dec = [[] for _ in inputs]
    groups = int(os.environ.get("EP_WORKER_GROUPS", "1"))
    if groups > 1:  # the sequences in `groups` groups, their decode steps in flight together (engine.submit)
        gs = [list(range(len(inputs)))[g::groups] for g in range(groups)]
        pending = []
        for i in range(len(decodes[0])):
            for g in gs:
                if len(pending) == groups:
                    done_g, h = pending.pop(0)
                    for b, o in zip(done_g, h.result()):
                        dec[b].append(o)
                pending.append((g, engine.submit([sids[b] for b in g], [[decodes[b][i]] for b in g])))
        for done_g, h in pending:
            for b, o in zip(done_g, h.result()):
                dec[b].append(o)
        for b in range(len(inputs)):
            out[f"decode.{b}"] = torch.cat(dec[b]).float().contiguous()
        return out
    for i in range(max(len(d) for d in decodes)):
        live = [b for b in range(len(inputs)) if i < len(decodes[b])]
        for b, o in zip(live, engine.decode([sids[b] for b in live], [decodes[b][i] for b in live])):
            dec[b].append(o)
    for b in range(len(inputs)):
        out[f"decode.{b}"] = torch.cat(dec[b]).float().contiguous()
    return out


def main() -> int:
    from safetensors.torch import save_file

    from llm_kernels.distributed import env_world

    ckpt, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    configs, inputs, decodes = (json.loads(a) for a in sys.argv[3:6])
    set_threads(1)
    max_len = max(len(a) + len(b) for a, b in zip(inputs, decodes))
    world = env_world()
    if world is None or world[1] == 1:
        from llm_kernels.checkpoint import load_checkpoint

        for i, (dt, backend, quant) in enumerate(configs):
            cfg, w = load_checkpoint(ckpt, dtype=DTYPES[dt], progress=False, quant=quant)
            engine = build_engine(w, cfg, DTYPES[dt], max_len, backend, batch=len(inputs))
            save_file(logits(engine, inputs, decodes), str(out_dir / f"{i}.safetensors"))
        return 0
    from llm_kernels.distributed.layout import RankLayout
    from llm_kernels.distributed.runner import run_rank
    from llm_kernels.models import load_config

    c = load_config(ckpt)
    layout = RankLayout(world[0], world[1], int(os.environ.get("EP_WORKER_PP", "1")), c.num_hidden_layers,
                        int(getattr(c, "n_routed_experts", 0) or 0))

    def body(ctx) -> int:
        for i, (dt, backend, quant) in enumerate(configs):
            cfg, w = ctx.load(ckpt, DTYPES[dt], quant)
            engine = ctx.wrap(build_engine(w, cfg, DTYPES[dt], max_len, backend, batch=len(inputs),
                                           **ctx.engine_kwargs()))
            if os.environ.get("EP_WORKER_PERTURB_RANK") == str(ctx.rank):  # a rank whose routing diverges
                gate = engine.ops.gate

                def perturbed(*a, **kw):
                    w_, i_ = gate(*a, **kw)
                    return w_ * 1.0000001, i_

                engine.ops.gate = perturbed
            res = logits(engine, inputs, decodes)
            if ctx.is_root:
                save_file(res, str(out_dir / f"{i}.safetensors"))
                if ctx.ops is not None:
                    (out_dir / f"{i}.stats.json").write_text(json.dumps(ctx.ops.stats.log))
                if ctx.pipe is not None:
                    st = ctx.pipe.stats
                    (out_dir / f"{i}.pipe.json").write_text(json.dumps(dict(sent=st.sent, recv=st.recv,
                                                                            logits=st.logits, calls=st.calls)))
        return 0

    return run_rank(body, rank=world[0], world_size=world[1], timeout=30.0,
                    settings=dict(configs=configs, inputs=inputs, decodes=decodes), checkpoint=ckpt, layout=layout)


if __name__ == "__main__":
    sys.exit(main())
