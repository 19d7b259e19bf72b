"""Qwen3 layer benchmark: roofline byte formulas vs a hand count, and an end-to-end
``python -m llm_kernels bench --preset qwen3-mini`` run (the package driver with the Qwen3
adapter) at tiny dimensions (reference + whatever is fused, bf16 and W8A8, transformers
cross-check)."""

from __future__ import annotations

import json
import math

import pytest

from llm_kernels.bench import driver
from llm_kernels.bench.qwen3.adapter import STAGE_OPS
from llm_kernels.models.qwen3 import roofline as rq
from llm_kernels.models.qwen3.config import Qwen3Config, qwen3_preset
TINY = ["--preset", "qwen3-mini", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16"]


def _cfg() -> Qwen3Config:
    # D=16, I=40, nq=4, nkv=2, d=8: Q=32, KV=16
    return qwen3_preset("qwen3-mini", num_hidden_layers=1).replace(
        hidden_size=16, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


# ============================================================ byte model
def test_stage_names_match_engine():
    from llm_kernels.runtime.qwen3.stages import STAGES

    assert rq.STAGES == STAGES


def test_roofline_hand_count_bf16():
    cfg, B, L = _cfg(), 3, 5
    bd = rq.layer_breakdown(cfg, B, L, "bf16")
    # input_norm_qkv: norm 16 + q 32x16 + k,v 16x16 each = 16+512+256+256 = 1040 params, x2 B
    assert bd["input_norm_qkv"].weights == 2080
    assert bd["input_norm_qkv"].activations == 3 * 16 * 2 + 3 * (32 + 32) * 2            # x in, q,k,v out
    # qk_norm_rope: 2 norm vectors of 8; KV write 3 rows x 2 (K,V) x 16 x 2 B
    assert bd["qk_norm_rope"] == rq.StageBytes(32, 3 * 2 * 16 * 2, 3 * 64 * 2 + 2 * 3 * 8 * 2 + 3 * 32 * 2)
    # attention: each sequence reads L+1 = 6 rows of K and V (2 heads x 8) in bf16
    assert bd["attention"] == rq.StageBytes(0, 3 * 6 * 2 * 16 * 2, 2 * 3 * 32 * 2)
    assert rq.kv_read_bytes(cfg, B, L) == 1152
    # o_proj [16, 32] + post norm 16
    assert bd["o_proj_residual_norm"] == rq.StageBytes((512 + 16) * 2, 0, 3 * 32 * 2 + 3 * 3 * 16 * 2)
    assert bd["gate_up_swiglu"] == rq.StageBytes(2 * 40 * 16 * 2, 0, 3 * 16 * 2 + 3 * 40 * 2)
    assert bd["down_residual"] == rq.StageBytes(16 * 40 * 2, 0, 3 * 40 * 2 + 2 * 3 * 16 * 2)
    assert rq.layer_weight_bytes(cfg, "bf16") == 2 * (1040 + 16 + 528 + 1280 + 640)
    assert rq.layer_bytes(cfg, B, L, "bf16") == sum(b.total for b in bd.values())


def test_roofline_hand_count_w8a8():
    cfg, B, L = _cfg(), 2, 0
    bd = rq.layer_breakdown(cfg, B, L, "w8a8")
    # INT8 projections + one fp32 scale per output channel; norms bf16
    assert bd["input_norm_qkv"].weights == 16 * 2 + (32 + 16 + 16) * 16 + 4 * (32 + 16 + 16)
    assert bd["qk_norm_rope"].weights == 2 * 8 * 2
    assert bd["o_proj_residual_norm"].weights == 16 * 32 + 4 * 16 + 16 * 2
    assert bd["gate_up_swiglu"].weights == 2 * (40 * 16 + 4 * 40)
    assert bd["down_residual"].weights == 16 * 40 + 4 * 16
    assert bd["attention"].cache == 2 * 1 * 2 * 16 * 2                 # L = 0: only the new row
    assert rq.kv_write_bytes(cfg, B) == 2 * 2 * 16 * 2
    # activations and KV bytes do not depend on the weight format
    bf = rq.layer_breakdown(cfg, B, L, "bf16")
    assert all(bd[s].cache == bf[s].cache and bd[s].activations == bf[s].activations for s in rq.STAGES)


def test_roofline_qwen3_32b_figures():
    cfg = qwen3_preset("qwen3-32b", num_hidden_layers=1)
    assert rq.layer_weight_bytes(cfg, "bf16") == 975_196_672       # 487.6 M params x 2 + norms
    assert rq.layer_weight_bytes(cfg, "w8a8") == 487_895_552
    assert rq.kv_read_bytes(cfg, 16, 4096) == 16 * 4097 * 2 * 8 * 128 * 2   # 268 MB
    assert rq.roofline_pct(40e9, 2.0, 40.0) == pytest.approx(50.0)
    assert rq.roofline_pct(1, 0.0, 40.0) is None


def test_roofline_rejects_bad_input():
    cfg = _cfg()
    with pytest.raises(ValueError):
        rq.stage_bytes(cfg, "moe", 1, 0)
    with pytest.raises(ValueError):
        rq.layer_bytes(cfg, 0, 10)
    with pytest.raises(ValueError):
        rq.layer_bytes(cfg, 1, 10, "fp8")
    with pytest.raises(ValueError):
        rq.roofline_pct(1, 1.0, 0.0)


# ============================================================ end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run: B=1,2, context 37 (pages of 16: a partial last page), reference and
    fused (if any stage is fused), bf16 and W8A8 (reference W8A8 included), eager transformers
    with a DynamicCache and a StaticCache."""
    tmp = tmp_path_factory.mktemp("bq3")
    out = tmp / "r.json"
    png = tmp / "r.png"
    argv = TINY + ["--batch", "1,2", "--context", "37", "--repeats", "1", "--warmup", "1", "--json", str(out),
                   "--quant", "none,w8a8", "--reference-w8a8", "--hf-attn", "eager", "--hf-cache", "dynamic,static",
            "--bw-bytes", str(64 * 2 ** 20),
                   "--quiet"]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(png)]
    except ImportError:
        png = None
    rc = driver.main(argv)
    return rc, json.loads(out.read_text()), png


def test_run_json_has_every_stage(run):
    rc, d, png = run
    assert rc == 0, d["errors"]
    assert d["benchmark"] == "bench_qwen3_layer" and d["context"] == 37 and d["batch"] == [1, 2]
    assert d["model_type"] == "qwen3" and d["preset"] == "qwen3-mini"
    assert d["bandwidth_gbs"] > 0 and d["bandwidth_gbs_end"] > 0
    assert set(d["bandwidth_gbs_per_batch"]) == {"1", "2"} and min(d["bandwidth_gbs_per_batch"].values()) > 0
    assert set(d["backends"]) == {"reference", "fused"}
    got = {(r["backend"], r["quant"], r["batch"]) for r in d["results"]}
    assert {("reference", q, B) for q in ("none", "w8a8") for B in (1, 2)} <= got
    if d["backends"]["fused"].startswith("ok"):
        assert {("fused", q, B) for q in ("none", "w8a8") for B in (1, 2)} <= got
    for r in d["results"]:
        assert set(r["stages"]) == set(rq.STAGES) | {"other"}
        assert r["total"]["median_s"] > 0
        assert math.isfinite(r["roofline_pct"]) and r["roofline_pct"] > 0
        for s in rq.STAGES:
            e = r["stages"][s]
            assert e["median_s"] > 0, (r["backend"], s)
            assert math.isfinite(e["roofline_pct"]) and e["bytes"] > 0
            assert e["impl"] in ("reference", "fused")
        cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        q = "bf16" if r["quant"] == "none" else "w8a8"
        assert r["layer_bytes"] == rq.layer_bytes(cfg, r["batch"], 37, q)
        assert r["stages"]["attention"]["kv_read_bytes"] == rq.kv_read_bytes(cfg, r["batch"], 37)
        assert math.isfinite(r["stages"]["attention"]["kv_roofline_pct"])
        assert r["bandwidth_gbs"] == d["bandwidth_gbs_per_batch"][str(r["batch"])]
        assert math.isfinite(r["roofline_pct_end_bw"]) and math.isfinite(r["roofline_pct_start_bw"])
        assert set(r["speedup_vs"]) == {"transformers/dynamic", "transformers/static"}
        assert r["speedup_vs_transformers"] == r["speedup_vs"]["transformers/dynamic"] > 0
    assert sorted((h["batch"], h["cache"]) for h in d["transformers"]) == [
        (1, "dynamic"), (1, "static"), (2, "dynamic"), (2, "static")]
    assert all(h["total"]["median_s"] > 0 for h in d["transformers"])
    if png is not None:
        assert png.stat().st_size > 1000


def test_run_cross_check_vs_transformers(run):
    """bf16 vs bf16: our reference reproduces transformers' eager bf16 numerics op by op, so the
    reference output equals transformers' here; fused kernels may round differently (e.g. fp32
    accumulation across a GEMM or the softmax), a few bf16 ulps (2^-8 relative) on some
    elements, which keeps the cosine at 1 - O(1e-5). 0.999 leaves two orders of margin and
    still catches a wrong weight mapping, RoPE position or cache layout (cosine << 0.99).
    W8A8 adds per-channel weight + per-token activation quantisation noise (~0.5 % relative per
    projection): cosine >= 0.999 too at these dims (0.9999 measured)."""
    _, d, _ = run
    for r in d["results"]:
        c = r["vs_transformers"]["cosine"]
        assert c >= 0.999, (r["backend"], r["quant"], r["batch"], c)
        if (r["backend"], r["quant"]) == ("reference", "none"):
            assert r["vs_transformers"]["max_abs_diff"] == 0.0   # eager transformers: bit-identical
    for h in d["transformers"]:  # DynamicCache and StaticCache give the same output
        assert h["vs_reference_none"]["max_abs_diff"] == 0.0


def test_speedups_and_no_fused(monkeypatch, tmp_path):
    """Without any fused stage the fused backend is skipped and reported; bad args give 2."""
    monkeypatch.setattr(driver, "resolve_backend", lambda spec, b: (
        spec.stages(b), {op: "reference" for op in STAGE_OPS.values()}, None))
    out = tmp_path / "r.json"
    main = driver.main
    rc = main(TINY + ["--batch", "1", "--context", "5", "--repeats", "1", "--warmup", "0", "--json", str(out),
                            "--quant", "none,w8a8", "--no-transformers", "--bandwidth", "40", "--quiet"])
    d = json.loads(out.read_text())
    assert rc == 0
    assert d["backends"]["fused"].startswith("skipped")
    assert [(r["backend"], r["quant"]) for r in d["results"]] == [("reference", "none")]
    assert any("reference/w8a8 not timed" in n for n in d["notes"])
    assert main(TINY + ["--quant", "w8a8", "--backends", "reference", "--no-transformers", "--quiet"]) == 2
    assert main(TINY + ["--quant", "fp8", "--quiet"]) == 2
    assert main(TINY + ["--hf-cache", "paged", "--quiet"]) == 2
    assert main(TINY + ["--context", "5000", "--quiet"]) == 2      # > max_position_embeddings of the mini preset
