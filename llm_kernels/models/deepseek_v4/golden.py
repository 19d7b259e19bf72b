"""Golden cases for DeepSeek-V4 on a seeded random ``mini`` checkpoint.

Golden: the stateless whole-sequence reference (``reference.deepseek_v4.model.forward``).
Implementation under test: the cached runtime (``runtime.DeepSeekV4Engine``) doing prefill
then single-token decode steps, batched with a second sequence. Run with
``python -m llm_kernels golden [-k NAME] [--save-data DIR] [--golden-data DIR]``.
Kernel issues add their stage cases here with the same golden.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...harness.compare import AllClose, CosineAtLeast, TopKTieAware
from ...harness.runner import GoldenCase
from ...harness.spec import RandInt, TensorSpec

__all__ = ["build_cases"]

# fp32: runtime decode vs whole-sequence reference differ only by GEMM shapes / summation
# order. Observed max-abs <= 1e-5 on logits of scale ~5 (300+ steps); bound 1e-4.
_FP32 = AllClose(rtol=0.0, atol=1e-4)


def _weights(dtype: torch.dtype, checkpoint: Path | None):
    from ...checkpoint import load_checkpoint
    from ...checkpoint.defaults import default_checkpoint

    return load_checkpoint(checkpoint or default_checkpoint(progress=False), dtype=dtype, progress=False)


def build_cases(checkpoint: Path | None = None) -> list[GoldenCase]:
    """Cases over ``checkpoint`` (default: the embedded mini checkpoint)."""
    from ...reference.deepseek_v4.indexer import indexer_topk
    from ...reference.deepseek_v4.model import forward
    from ...runtime.deepseek_v4.engine import DeepSeekV4Engine

    cases = []
    for prompt_len, steps, dtype in ((20, 140, torch.float32), (130, 12, torch.float32),
                                     (40, 8, torch.bfloat16)):
        name = f"runtime_decode/p{prompt_len}_d{steps}_{str(dtype).split('.')[-1]}"
        total = prompt_len + steps

        def golden(v, total=total, prompt_len=prompt_len, dtype=dtype):
            cfg, w = _weights(dtype, checkpoint)
            ids = v["input_ids"]
            return {"logits": forward(w, cfg, ids, dtype)[prompt_len - 1:],
                    "other_logits": forward(w, cfg, v["other_ids"], dtype)[-1:]}

        def impl(v, total=total, prompt_len=prompt_len, dtype=dtype):
            cfg, w = _weights(dtype, checkpoint)
            ids, other = v["input_ids"].tolist(), v["other_ids"].tolist()
            eng = DeepSeekV4Engine(w, cfg, dtype=dtype, max_seq_len=total)
            # the second sequence rides along in the same batch: it is prefilled with its
            # first half and decodes its second half during the first steps (needs steps >= 8)
            half = len(other) // 2
            assert total - prompt_len >= len(other) - half
            (a, b), (la, _) = eng.prefill([ids[:prompt_len], other[:half]])
            rows, other_last = [la[-1:]], None
            for i in range(prompt_len, total):
                j = half + (i - prompt_len)
                if j < len(other):
                    oa, ob = eng.decode([a, b], [ids[i], other[j]])
                    other_last = ob
                else:
                    (oa,) = eng.decode([a], [ids[i]])
                rows.append(oa)
            return {"logits": torch.cat(rows), "other_logits": other_last}

        cmp = _FP32 if dtype == torch.float32 else CosineAtLeast(0.9999)
        cases.append(GoldenCase(
            name=name,
            inputs=[TensorSpec("input_ids", (total,), torch.int64, RandInt(0, 512, seed=prompt_len)),
                    TensorSpec("other_ids", (16,), torch.int64, RandInt(0, 512, seed=1000 + prompt_len)),
                    TensorSpec("logits", (steps + 1, 512), torch.float32, is_output=True),
                    TensorSpec("other_logits", (1, 512), torch.float32, is_output=True)],
            golden=golden, impl=impl, comparators={"logits": cmp, "other_logits": cmp}))

    # indexer top-k: the tie-aware comparator accepts an equal-score swap only
    def topk_golden(v):
        return {"topk": indexer_topk(v["scores"], v["positions"], 4, 8)}

    def topk_impl(v):
        s = v["scores"]
        # independent formulation: sort the causally valid scores, keep 8, pad with -1
        limit = (v["positions"] + 1) // 4
        out = torch.full((s.shape[0], min(8, s.shape[1])), -1, dtype=torch.int64)
        for t in range(s.shape[0]):
            n = int(min(limit[t], s.shape[1]))
            order = torch.argsort(s[t, :n], descending=True, stable=True)[:8]
            out[t, : order.numel()] = order
        return {"topk": out}

    cases.append(GoldenCase(
        name="indexer_topk/causal",
        inputs=[TensorSpec("scores", (24, 20), torch.float32, RandInt(0, 6, seed=3)),  # many exact ties
                TensorSpec("positions", (24,), torch.int64, lambda shape, dt: torch.arange(60, 84) - 50),
                TensorSpec("topk", (24, 8), torch.int64, is_output=True)],
        golden=topk_golden, impl=topk_impl,
        comparators={"topk": TopKTieAware("scores")}))
    return cases


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``python -m llm_kernels golden``): runs :func:`build_cases`."""
    from ...harness.runner import main as run_main

    ckpt = os.environ.get("LLM_KERNELS_GOLDEN_CHECKPOINT")
    return run_main(build_cases(Path(ckpt) if ckpt else None), argv)
