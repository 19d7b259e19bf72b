"""Small random Qwen3 configs for the conformance tests (transformers as the oracle).

* ``mini``: the ``qwen3-mini`` preset (GQA 8:2, head_dim 64 != hidden/heads, untied).
* ``tied_mha``: tied embeddings, MHA (kv heads = q heads), rope_theta 1e4.
* ``yarn_mqa``: MQA (1 kv head), YaRN factor 4 over 128 original positions (the prompts run
  past 128), attention_factor inferred as 0.1 ln 4 + 1.
* ``scaled``: mini written with ``weight_scale=2`` (larger activations).
* ``odd``: hidden 72, head_dim 40, 6:3 heads, intermediate 100: nothing a multiple of 16.

fp32 tolerance: ``FP32_LOGIT_ULPS · eps32 · max|logit|`` as for DeepSeek-V4 (helpers.py):
the reference and transformers run the same fp32 ops, differing only in GEMM blocking and
reduction order; 192 ulps of the logit scale leaves > 10x margin over what is observed.
bf16: both sides round at the same ops (eager attention), so the bound asserted is
cosine >= 0.9999 (observed 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_kernels.numerics.rope import RopeParameters
from llm_kernels.models import preset
from llm_kernels.models.qwen3.config import Qwen3Config


@dataclass(frozen=True)
class Q3Case:
    name: str
    cfg: Qwen3Config
    seed: int
    weight_scale: float = 1.0


def _mini() -> Qwen3Config:
    return preset("qwen3-mini")


Q3_CASES = {
    "mini": Q3Case("mini", _mini(), seed=0),
    "tied_mha": Q3Case("tied_mha", Qwen3Config(
        vocab_size=384, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=24, rope=RopeParameters("default", 10000.0),
        max_position_embeddings=1024, tie_word_embeddings=True), seed=1),
    "yarn_mqa": Q3Case("yarn_mqa", Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=1, head_dim=32,
        rope=RopeParameters("yarn", 1000000.0, factor=4.0, original_max_position_embeddings=128,
                            attention_factor=0.1 * __import__("math").log(4.0) + 1.0),
        max_position_embeddings=512), seed=2),
    "scaled": Q3Case("scaled", _mini(), seed=3, weight_scale=2.0),
    "odd": Q3Case("odd", Qwen3Config(
        vocab_size=300, hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=40, max_position_embeddings=1024), seed=4),
}
Q3_CASE_NAMES = list(Q3_CASES)


def q3_ids(case: Q3Case, n: int, salt: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.seed * 1000 + salt)
    return torch.randint(0, case.cfg.vocab_size, (n,), generator=g)
