"""Shared helpers of the transformers-conformance tests: tolerances and small comparison /
oracle utilities (the test configs live in ``zoo.py`` and are re-exported here). Imported by ``tests/conftest.py`` and the test
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

Qwen3 uses the same fp32 bound (the reference and transformers run the same fp32 ops,
differing only in GEMM blocking and reduction order; observed bit-exact vs eager attention)
and, for bf16 (both sides round at the same ops with eager attention), cosine >= 0.9999
(observed 1.0).
"""

from __future__ import annotations

import torch
from zoo import CASE_NAMES, CASES, Q3_CASE_NAMES, Q3_CASES, Case

from llm_kernels.models.deepseek_v4.config import DeepSeekV4Config

EPS32 = torch.finfo(torch.float32).eps  # 1.1920929e-07
FP32_LOGIT_ULPS = 192
# bf16 whole-prompt logits vs transformers (default experts backend, see conftest): the two
# implementations round at the same points, observed bit-exact (cosine 1.0, max abs 0).
BF16_MIN_COSINE = 0.9999


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


def q3_ids(case: Case, n: int, salt: int = 100) -> torch.Tensor:
    """Deterministic random token ids [n] of a Qwen3 case (seeded by case seed and ``salt``)."""
    g = torch.Generator().manual_seed(case.seed * 1000 + salt)
    return torch.randint(0, case.cfg.vocab_size, (n,), generator=g)


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


__all__ = [
    "BF16_MIN_COSINE",
    "CASES",
    "CASE_NAMES",
    "EPS32",
    "FP32_LOGIT_ULPS",
    "Q3_CASES",
    "Q3_CASE_NAMES",
    "Case",
    "assert_close_fp32",
    "cosine",
    "fp32_atol",
    "gcd_chunks",
    "hf_cached_run",
    "hf_logits",
    "max_abs",
    "q3_ids",
    "randn",
    "ratio_emitted",
    "token_ids",
]
