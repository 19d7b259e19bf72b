"""Fused backend determinism: the same inputs give bitwise the same logits run after run
and for 1 or 2 threads (Numba and torch), W8A8 bf16 path on a mini checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.models import preset

SCRIPT = r"""
import sys, torch
from safetensors.torch import save_file
from llm_kernels.checkpoint import load_checkpoint
from llm_kernels.runtime.deepseek_v4.stages import FUSED_OPS
from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine
ckpt, out = sys.argv[1], sys.argv[2]
cfg, w = load_checkpoint(ckpt, dtype=torch.bfloat16, progress=False, quant="w8a8")
eng = DeepSeekV4Engine(w, cfg, torch.bfloat16, max_seq_len=64, ops=FUSED_OPS)
ids = [(7 * i + 3) % cfg.vocab_size for i in range(40)]
(a, b), (la, lb) = eng.prefill([ids[:30], ids[:17]])
rows = [la, lb]
for t in ids[30:]:
    oa, ob = eng.decode([a, b], [t, (t * 5) % cfg.vocab_size])
    rows += [oa, ob]
save_file({"logits": torch.cat(rows).contiguous()}, out)
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(preset("mini"), tmp_path_factory.mktemp("det") / "m", seed=3,
                                   dtype=torch.bfloat16, progress=False)


def _run(ckpt, out, threads):
    env = {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    import os
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), str(out)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file
    return load_file(str(out))["logits"]


def test_fused_logits_bitwise_deterministic(ckpt, tmp_path):
    a = _run(ckpt, tmp_path / "a.safetensors", 2)
    b = _run(ckpt, tmp_path / "b.safetensors", 2)
    c = _run(ckpt, tmp_path / "c.safetensors", 1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), "run-to-run difference"
    assert torch.equal(a, c), f"1 vs 2 threads differ: max abs {(a - c).abs().max().item()}"
