"""Fused Qwen3 q/k norm + RoPE + paged cache write (``kernels.qwen3.qk_norm_rope``) vs the
torch reference ``reference.qwen3.qk_norm_rope.qk_norm_rope``.

Contract: bitwise equal in fp32 and bf16 (same rounding points, torch's sum order for the
RMS statistic), for q, for the k rows written into the cache and for the v rows (copied).
Cache slots not named by ``slot_mapping`` must stay untouched.
"""

from __future__ import annotations

import numba
import pytest
import torch

from llm_kernels.numerics.rope import RopeParameters
from llm_kernels.kernels.qwen3.qk_norm_rope import qk_norm_rope_cache
from llm_kernels.numerics.rounding import rnd
from llm_kernels.reference.qwen3.common import rope_cos_sin
from llm_kernels.reference.qwen3.qk_norm_rope import qk_norm_rope

DTYPES = [torch.float32, torch.bfloat16]
ROPE = RopeParameters("default", 1_000_000.0)


def make(T, nq, nkv, D, BS, NB, dtype, seed=0, w_dtype=None, q_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q = rnd(torch.randn(T, nq * D, generator=g) * q_scale, dtype)
    k = rnd(torch.randn(T, nkv * D, generator=g), dtype)
    v = rnd(torch.randn(T, nkv * D, generator=g), dtype)
    wd = w_dtype or dtype
    wq = (torch.rand(D, generator=g) + 0.5).to(wd)
    wk = (torch.rand(D, generator=g) + 0.5).to(wd)
    pos = torch.randint(0, 40_000, (T,), generator=g)
    cos, sin = rope_cos_sin(ROPE, D, pos, dtype)
    kc = torch.full((NB, nkv, BS, D), 7.0, dtype=dtype)  # sentinel: untouched rows stay 7
    vc = torch.full_like(kc, 7.0)
    slots = torch.randperm(NB * BS, generator=g)[:T]
    return {"q": q, "k": k, "v": v, "q_norm_w": wq, "k_norm_w": wk, "cos": cos, "sin": sin, "eps": 1e-6, "dtype": dtype,
                "k_cache": kc, "v_cache": vc, "slot_mapping": slots}


def run(a):
    return qk_norm_rope_cache(a["q"], a["k"], a["v"], a["q_norm_w"], a["k_norm_w"], a["cos"], a["sin"], a["eps"],
                              a["dtype"], a["k_cache"], a["v_cache"], a["slot_mapping"])


def check_exact(a, out):
    T = a["q"].shape[0]
    BS = a["k_cache"].shape[2]
    nkv, D = a["k_cache"].shape[1], a["k_cache"].shape[3]
    rq, rk = qk_norm_rope(a["q"], a["k"], a["q_norm_w"], a["k_norm_w"], a["cos"], a["sin"], a["eps"], a["dtype"])
    assert out.dtype == torch.float32 and out.shape == rq.shape
    assert torch.equal(out, rq), f"q differs: max {float((out - rq).abs().max())}"
    s = a["slot_mapping"]
    kk = a["k_cache"][s // BS, :, s % BS].float()
    vv = a["v_cache"][s // BS, :, s % BS].float()
    assert torch.equal(kk, rk), f"k rows differ: max {float((kk - rk).abs().max())}"
    assert torch.equal(vv, a["v"].reshape(T, nkv, D))
    mask = torch.ones(a["k_cache"].shape[0] * BS, dtype=torch.bool)
    mask[s] = False
    for c in (a["k_cache"], a["v_cache"]):
        rest = c.permute(0, 2, 1, 3).reshape(-1, nkv, D)[mask]
        assert bool((rest == 7.0).all()), "a slot outside slot_mapping was written"


# (T, nq, nkv, D, block_size, num_blocks): decode sizes, Qwen3-32B heads, odd head dims,
# kv ratio 1 with block size 1, and a prefill-sized step
CASES = [
    (1, 8, 2, 128, 16, 4),
    (4, 64, 8, 128, 16, 8),
    (7, 12, 4, 72, 5, 9),
    (33, 6, 6, 40, 1, 40),
    (300, 8, 1, 64, 16, 24),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_q{}_kv{}_D{}_bs{}".format(*c[:5]))
def test_bit_exact(case, dtype):
    a = make(*case, dtype=dtype, seed=sum(case))
    check_exact(a, run(a))


def test_bf16_mode_with_fp32_weights_and_large_inputs():
    """Weights of another float dtype are used as float32; large activations stress the
    statistic (rows with |x| ~ 1e3)."""
    a = make(5, 16, 4, 128, 16, 6, torch.bfloat16, seed=3, w_dtype=torch.float32, q_scale=1e3)
    check_exact(a, run(a))


def test_thread_count_invariant():
    a = make(9, 16, 2, 96, 8, 6, torch.bfloat16, seed=5)
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        o1 = run(a)
    finally:
        numba.set_num_threads(n)
    o2 = run(b)
    assert torch.equal(o1, o2) and torch.equal(a["k_cache"], b["k_cache"]) and torch.equal(a["v_cache"], b["v_cache"])


def _bad(**over):
    a = make(3, 8, 2, 64, 4, 4, torch.bfloat16, seed=1)
    a.update(over)
    return a


@pytest.mark.parametrize("over, exc, match", [
    ({"dtype": torch.float16}, ValueError, "dtype must be"),
    ({"q": torch.zeros(3, 8 * 64 + 1)}, ValueError, "q must have shape"),
    ({"q": torch.zeros(3, 8 * 64, dtype=torch.float64)}, TypeError, "q must be a float32"),
    ({"k": torch.zeros(3, 3 * 64)}, ValueError, r"k must have shape \[3, 128\]"),
    ({"k": torch.zeros(4, 2 * 64)}, ValueError, r"k must have shape \[3, 128\]"),
    ({"v": torch.zeros(3, 2 * 64 + 2)}, ValueError, r"v must have shape \[3, 128\]"),
    ({"cos": torch.zeros(3, 32)}, ValueError, r"cos must have shape \[3, 64\]"),
    ({"sin": torch.zeros(2, 64)}, ValueError, r"sin must have shape \[3, 64\]"),
    ({"k_norm_w": torch.ones(63)}, ValueError, r"k_norm_w must have shape \[D=64\]"),
    ({"q_norm_w": torch.ones(63)}, ValueError, "must be even"),
    ({"q_norm_w": torch.ones(2, 64)}, ValueError, "q_norm_w must be a 1-D"),
    ({"k_cache": torch.zeros(4, 2, 4, 64)}, TypeError, "k_cache dtype must be torch.bfloat16"),
    ({"v_cache": torch.zeros(4, 2, 4, 64)}, TypeError, "v_cache dtype must be torch.bfloat16"),
    ({"v_cache": torch.zeros(5, 2, 4, 64, dtype=torch.bfloat16)}, ValueError, "v_cache shape"),
    ({"k_cache": torch.zeros(4, 2, 4, 32, dtype=torch.bfloat16), "v_cache": torch.zeros(4, 2, 4, 32, dtype=torch.bfloat16)},
     ValueError, "head dim 32 must equal D=64"),
    ({"k_cache": torch.zeros(4, 2, 4, dtype=torch.bfloat16)}, ValueError, "k_cache must be a 4-D"),
    ({"k_cache": torch.zeros(4, 2, 8, 64, dtype=torch.bfloat16)[:, :, ::2]}, ValueError, "contiguous"),
    ({"slot_mapping": torch.tensor([0, 1, 16])}, ValueError, r"slot_mapping\[2\]=16 is outside"),
    ({"slot_mapping": torch.tensor([0, -1, 2])}, ValueError, r"slot_mapping\[1\]=-1 is outside"),
    ({"slot_mapping": torch.tensor([5, 1, 5])}, ValueError, "repeats a slot"),
    ({"slot_mapping": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "slot_mapping must be an int64"),
    ({"slot_mapping": torch.tensor([0, 1])}, ValueError, r"slot_mapping must have shape \[T=3\]"),
])
def test_errors(over, exc, match):
    a = _bad(**over)
    with pytest.raises(exc, match=match):
        run(a)
