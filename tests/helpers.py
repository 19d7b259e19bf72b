"""Shared helpers of the transformers-conformance tests: the test configs, tolerances and
small comparison / oracle utilities. Imported by ``tests/conftest.py`` and the test
modules (``tests/`` is on ``sys.path`` through the rootdir conftest).

Tolerance policy (fp32). Every fp32 comparison of logits is bounded by

    atol = FP32_LOGIT_ULPS * eps_fp32 * max|reference logits|,   eps_fp32 = 2**-23 ≈ 1.19e-7

i.e. a fixed number of fp32 rounding units relative to the logit scale. The worst error
observed over all configs and all fp32 logit comparisons of the conformance tests
(whole-prompt forward, 300-step cached decode, chunked / batched steps, re-prefill) is
9.1e-6 on logits of max 4.8, i.e. 17.7 units of ``eps · max|logit|`` (``scaled`` config,
3-token steps vs transformers); the whole-prompt forward is bit-exact or <= 5.2 units.
(transformers' own prefill-vs-cached-decode disagreement is ~3e-7 on logits of scale ~1,
``oracle_notes.md``.) ``FP32_LOGIT_ULPS = 192`` puts the bound ~11x above the worst
observed value (1.1e-4 for logits of scale 5) and still ~2-4 orders of magnitude below a
real defect (a wrong RoPE sign, a missing compressed entry, a stale window row or a wrong
expert move logits by 1e-2 .. 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_kernels.models.deepseek_v4.config import CSA, HCA, SLIDING, DeepSeekV4Config
from llm_kernels.numerics.rope import RopeParameters
from llm_kernels.models import preset

EPS32 = torch.finfo(torch.float32).eps  # 1.1920929e-07
FP32_LOGIT_ULPS = 192
# bf16 whole-prompt logits vs transformers (default experts backend, see conftest): the two
# implementations round at the same points, observed bit-exact (cosine 1.0, max abs 0).
BF16_MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Case:
    """One conformance config: the model config, the checkpoint seed and weight scale."""

    name: str
    cfg: DeepSeekV4Config
    seed: int
    weight_scale: float = 1.0


def _mini() -> DeepSeekV4Config:
    return preset("mini")


def _wide() -> DeepSeekV4Config:
    """Different dims from ``mini`` everywhere: D 96, 6 heads of 32 (rope 8), 3 output
    groups, q_lora 48, 16 indexer heads of 16 with top-8 (binding: a CSA layer has 75
    entries at 300 tokens), 6 experts top-3 with sigmoid scoring, two hash layers, HCA
    first, hc_mult 3, non-default RoPE thetas and its own YaRN profile."""
    return preset("mini").replace(
        vocab_size=384, hidden_size=96, num_hidden_layers=4, num_attention_heads=6, head_dim=32,
        qk_rope_head_dim=8, o_groups=3, o_lora_rank=24, q_lora_rank=48, moe_intermediate_size=48,
        n_routed_experts=6, num_experts_per_tok=3, scoring_func="sigmoid",
        layer_types=(HCA, CSA, SLIDING, CSA), mlp_layer_types=("hash_moe", "hash_moe", "moe", "moe"),
        index_n_heads=16, index_head_dim=16, index_topk=8, hc_mult=3, routed_scaling_factor=2.5,
        rope_main=RopeParameters("default", 20000.0),
        rope_compress=RopeParameters("yarn", 40000.0, factor=8.0, original_max_position_embeddings=4096,
                                     beta_fast=32.0, beta_slow=1.0, attention_factor=1.0))


def _swa32() -> DeepSeekV4Config:
    """Sliding window 32 (wraps after 32 tokens) with the real compress ratios 4 / 128, and
    a CSA layer first."""
    return preset("mini").replace(sliding_window=32, layer_types=(CSA, SLIDING, HCA, CSA))


CASES: dict[str, Case] = {
    "mini": Case("mini", _mini(), seed=0),
    "wide": Case("wide", _wide(), seed=1),
    # oracle_notes.md: scale the weights up so differences are not hidden by tiny activations
    "scaled": Case("scaled", _mini(), seed=2, weight_scale=2.0),
    "swa32": Case("swa32", _swa32(), seed=3),
}
CASE_NAMES = ["mini", "wide", "scaled", "swa32"]
# Long-run variants (slow test only): index_topk >= every possible number of compressed
# entries, so fp32-noise near-ties at the top-k boundary cannot flip a selection (see
# test_engine_long_decode_matches_transformers_cached_decode).
CASES["mini_topk_all"] = Case("mini_topk_all", _mini().replace(index_topk=1024), seed=0)
CASES["swa32_topk_all"] = Case("swa32_topk_all", _swa32().replace(index_topk=1024), seed=3)


# ---------------------------------------------------------------------------- numerics
def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors, computed in float64 (torch's fp32
    ``cosine_similarity`` loses ~1e-5 over 1e5 elements)."""
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def fp32_atol(ref: torch.Tensor, ulps: float = FP32_LOGIT_ULPS) -> float:
    """``ulps · eps_fp32 · max|ref|`` (see the module docstring)."""
    return ulps * EPS32 * ref.abs().max().item()


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, what: str,
                      ulps: float = FP32_LOGIT_ULPS) -> float:
    """Assert ``max|actual - expected| <= fp32_atol(expected, ulps)``; return the error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_abs(actual, expected)
    tol = fp32_atol(expected, ulps)
    assert err <= tol, (f"{what}: max abs {err:.3g} > tol {tol:.3g} "
                        f"({ulps} * eps32 * max|ref| = {ulps} * {EPS32:.3g} * {expected.abs().max().item():.3g})")
    return err


def token_ids(cfg: DeepSeekV4Config, n: int, seed: int) -> torch.Tensor:
    """Deterministic random token ids [n] int64 in [0, vocab_size)."""
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@torch.no_grad()
def hf_logits(m, ids: torch.Tensor) -> torch.Tensor:
    """transformers whole-sequence logits [T, V] float32 for ids [T] (no cache)."""
    return m(ids[None], use_cache=False).logits[0].float()


@torch.no_grad()
def hf_cached_run(m, ids: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    """transformers with its cache: the first chunk as a prefill, then every further
    chunk fed with ``cache=`` (the decode path). Returns logits per chunk."""
    out = []
    pkv = None
    pos = 0
    for n in chunks:
        o = m(ids[None, pos:pos + n], cache=pkv, use_cache=True)
        pkv = o.cache
        out.append(o.logits[0].float())
        pos += n
    return out


def ratio_emitted(cfg: DeepSeekV4Config, n_tokens: int) -> dict[str, int]:
    """Compressed entries a compressor of each ratio holds after ``n_tokens`` tokens."""
    return {lt: n_tokens // r for lt, r in cfg.compress_rates}


def gcd_chunks(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` into a repeating pattern of ``sizes`` (last chunk truncated)."""
    out, i = [], 0
    while sum(out) < total:
        out.append(min(sizes[i % len(sizes)], total - sum(out)))
        i += 1
    assert sum(out) == total and all(c > 0 for c in out)
    return out


__all__ = ["EPS32", "FP32_LOGIT_ULPS", "BF16_MIN_COSINE", "Case", "CASES", "CASE_NAMES", "max_abs",
           "cosine", "fp32_atol", "assert_close_fp32", "token_ids", "randn", "hf_logits",
           "hf_cached_run", "ratio_emitted", "gcd_chunks"]
