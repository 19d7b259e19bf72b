"""Peak memory of loading a checkpoint and building its engine (issue 11: peak RSS at most
the resident weight bytes plus 1 GB).

Each case runs in a fresh child process: import the package, note the RSS, then
``load_checkpoint`` + ``make_engine(consume_weights=True)`` (fused backend, bf16) and report

* ``base``: RSS after the imports (Python, torch, numba: paid before any weight);
* ``weights``: the resident weight bytes, counted from the engine's prepared weights
  (:func:`llm_kernels.bench.weight_bytes.weight_storage`, each tensor/pack once);
* ``peak``: the process's peak RSS (``ru_maxrss``) over load + build;
* ``over``: ``peak - weights`` (what the issue bounds by 1 GB), and ``peak - weights - base``.

Run::

    python benchmarks/load_memory.py /tmp/flash3:int8_g32 /tmp/flash3:w8a8 /tmp/flash3_rel
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time, torch
from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint
from llm_kernels.bench.weight_bytes import weight_storage
from llm_kernels.runtime.memory import prompt_release, rss
path, quant = sys.argv[1], (sys.argv[2] or None)
prompt_release()
base = rss()["rss"]
t0 = time.perf_counter()
cfg, w = load_checkpoint(path, dtype=torch.bfloat16, quant=quant, progress=False)
load_s = time.perf_counter() - t0
eng = models.spec_for_config(cfg).make_engine(w, cfg, dtype=torch.bfloat16, max_seq_len=64, backend="fused",
                                              consume_weights=True)
del w
seen = set()
weights = sum(weight_storage(t, seen) for t in eng.w.values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"model": cfg.summary(), "base": base, "weights": weights, "peak": peak,
                  "after": rss()["rss"], "load_s": load_s}))
"""


def main(argv=None) -> int:
    cases = (argv if argv is not None else sys.argv[1:]) or ["/tmp/flash3:int8_g32"]
    print(f"{'checkpoint:quant':42s} {'weights':>9s} {'base':>7s} {'peak':>9s} {'peak-weights':>13s} "
          f"{'-base':>7s}  load")
    for case in cases:
        path, _, quant = case.partition(":")
        r = subprocess.run([sys.executable, "-c", _CHILD, path, quant], capture_output=True, text=True)
        if r.returncode:
            print(f"{case}: failed\n{r.stderr[-2000:]}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        gib = 2**30
        print(f"{case:42s} {d['weights'] / gib:7.2f} G {d['base'] / gib:5.2f} G {d['peak'] / gib:7.2f} G "
              f"{(d['peak'] - d['weights']) / gib:11.2f} G {(d['peak'] - d['weights'] - d['base']) / gib:5.2f} G"
              f"  {d['load_s']:.0f} s   ({d['model']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
