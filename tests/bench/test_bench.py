"""Benchmark infrastructure: roofline byte model vs spec §14, timing statistics, paired
A/B, JSON results, tables, and an end-to-end ``python -m llm_kernels bench`` run (the
package driver with the DeepSeek-V4 adapter) on the mini preset (reference + fused
backends, transformers comparison included)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from llm_kernels.models.deepseek_v4.config import CSA, HCA, SLIDING
from llm_kernels.models import preset
from llm_kernels.models.deepseek_v4 import roofline as rf
from llm_kernels import models
from llm_kernels.bench import driver
from llm_kernels.bench.core import (
    COLD_BYTES,
    BenchResult,
    Rotation,
    bench,
    cold_copies,
    format_table,
    interleaved,
    machine_info,
    measure_dram_bandwidth,
    paired_ab,
    read_results,
    write_results,
)


# ============================================================ roofline vs spec §14
FLASH_W8A8 = {  # spec §14.1
    "attention_common": 148_532_588,
    "csa_extra": 29_971_712,
    "hca_extra": 8_651_776,
    "moe_dense": 30_975_084,
    "routed_expert": 25_198_592,
}
FLASH_DENSE = {"swa": 179_507_672, "csa": 209_479_384, "hca": 188_159_448}
PRO_W8A8 = {  # spec §14.2
    "attention_common": 384_744_044, "csa_extra": 50_287_872, "hca_extra": 14_943_232,
    "moe_dense": 79_892_076, "routed_expert": 66_113_536,
}
PRO_DENSE = {"csa": 514_923_992, "hca": 479_579_352, "swa": 464_636_120}


@pytest.mark.parametrize("name,parts,dense", [("flash", FLASH_W8A8, FLASH_DENSE), ("pro", PRO_W8A8, PRO_DENSE)])
def test_weight_parts_match_spec_tables(name, parts, dense):
    cfg = preset(name)
    for lt in ("swa", "csa", "hca"):
        got = rf.weight_parts(cfg, lt, "w8a8")
        assert got["attention_common"] == parts["attention_common"]
        assert got["moe_dense"] == parts["moe_dense"]
        assert got["routed_expert"] == parts["routed_expert"]
        if lt != "swa":
            assert got[f"{lt}_extra"] == parts[f"{lt}_extra"]
        assert got["dense_total"] == dense[lt], lt


def test_model_dense_bytes_and_spec_examples():
    f = preset("flash")
    assert rf.model_dense_weight_bytes(f) == 8_521_271_368                    # 43 layers, §14.1
    assert rf.model_dense_weight_bytes(preset("pro")) == 30_314_679_672        # 61 layers, §14.2
    assert rf.lm_head_bytes(f, 1) - 4 * 129280 - 4 * 4 * 4096 == 1_059_061_760 + 262_144 + 4 * 4 + 4 + 8192
    # routed bytes per step, 1 row -> 6 experts/layer x 43 layers = 6.05 GiB (§14.1)
    routed = 43 * 6 * rf.weight_parts(f, "csa")["routed_expert"]
    assert round(routed / 2 ** 30, 2) == 6.05
    assert rf.experts_active_default(f, 1) == 6 and rf.experts_active_default(f, 8) == 48
    assert rf.experts_active_default(f, 100) == 256


def test_kv_read_bytes_match_spec_14_4():
    """Per request, per layer, one query row at L (§14.4): SWA 128 KiB, CSA 772, HCA 160 KiB
    at 4096; CSA 904 / HCA 192 KiB at 8192 (window + compressed rows + indexer keys)."""
    f = preset("flash")
    for L, want in ((4096, {"swa": 128, "csa": 772, "hca": 160}), (8192, {"swa": 128, "csa": 904, "hca": 192})):
        for lt, kib in want.items():
            attn = rf.stage_breakdown(f, "sparse_attn", lt, 1, L).cache
            keys = ((L + 1) // 4) * 132 if lt == "csa" else 0
            assert (attn + keys) / 1024 == kib, (L, lt)
            if lt == "csa":  # the indexer stage holds the key reads (+ small amortised state)
                assert rf.stage_breakdown(f, "indexer", lt, 1, L).cache >= keys


def test_stage_bytes_structure():
    f = preset("flash")
    for q in rf.QUANT_MODES:
        for lt in ("swa", "csa", "hca"):
            bd = rf.layer_breakdown(f, lt, 8, 4096, q)
            assert set(bd) == set(rf.LAYER_STAGES)
            assert rf.layer_bytes(f, lt, 8, 4096, q) == sum(b.total for b in bd.values())
            dense = rf.weight_parts(f, lt, q)["dense_total"]
            expert = rf.weight_parts(f, lt, q)["routed_expert"]
            assert sum(b.weights for b in bd.values()) == dense + 48 * expert
            assert (bd["compressor"].total == 0) == (lt == "swa")
            assert (bd["indexer"].total == 0) == (lt != "csa")
            for s, b in bd.items():
                assert rf.stage_bytes(f, s, lt, 8, 4096, q) == b.total
    # bf16: INT8 tensors become BF16 without scales, no Hadamard
    assert rf.weight_parts(f, "swa", "bf16")["routed_expert"] == 3 * 2048 * 4096 * 2
    assert rf.weight_parts(f, "csa", "bf16")["csa_extra"] == 29_971_712 - 8_421_376 - 32_768 + 8192 * 1024 * 2
    # release: routed experts MXFP4 (4 bits + 1 byte per 32), the rest as int8_g32
    n_exp = 3 * 2048 * 4096
    assert rf.weight_parts(f, "csa", "release")["routed_expert"] == n_exp // 2 + n_exp // 32 == 13_369_344
    assert rf.weight_parts(f, "csa", "release")["dense_total"] == rf.weight_parts(f, "csa", "int8_g32")["dense_total"]
    assert rf.lm_head_bytes(f, 1, "int8_g32") < rf.lm_head_bytes(f, 1, "w8a8")  # the head is INT8 in int8_g32
    # experts_active override, monotone in T and L
    assert rf.stage_bytes(f, "moe", "csa", 8, 4096, experts_active=10) < rf.stage_bytes(f, "moe", "csa", 8, 4096)
    assert rf.layer_bytes(f, "csa", 1, 65536) > rf.layer_bytes(f, "csa", 1, 4096)
    assert rf.layer_bytes(f, "swa", 8, 4096) > rf.layer_bytes(f, "swa", 1, 4096)
    # rows per sequence: 4 x 2 rows share window / indexer reads
    assert rf.stage_bytes(f, "sparse_attn", "swa", 8, 4096, rows_per_seq=2) < rf.stage_bytes(f, "sparse_attn", "swa", 8, 4096)
    for bad in (dict(quant="int4"), dict(stage="nope"), dict(layer_type="full")):
        kw = dict(cfg=f, stage="moe", layer_type="csa", T=1, L=10, quant="w8a8") | bad
        with pytest.raises(ValueError):
            rf.stage_bytes(**kw)
    with pytest.raises(ValueError):
        rf.stage_bytes(f, "moe", "csa", 3, 10, rows_per_seq=2)
    assert rf.layer_type_name("csa") == CSA and rf.layer_type_name(SLIDING) == SLIDING
    assert rf.layer_type_name("hca") == HCA
    assert rf.roofline_seconds(34e9, 34.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        rf.roofline_seconds(1, 0)


# ============================================================ timing helpers
class FakeClock:
    """Deterministic timer: each fn call advances time by the next scripted duration."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_bench_statistics_on_fake_function():
    clock = FakeClock()
    durations = iter([9.0, 9.0, 3.0, 1.0, 2.0, 5.0, 4.0])  # 2 warm-up, then 5 timed
    calls, setups = [], []

    def fn():
        clock.t += next(durations)
        calls.append(1)

    res = bench(fn, repeats=5, warmup=2, setup=lambda: setups.append(clock.t), timer=clock)
    assert isinstance(res, BenchResult)
    assert res.runs == (3.0, 1.0, 2.0, 5.0, 4.0)
    assert (res.median_s, res.min_s, res.max_s) == (3.0, 1.0, 5.0)
    assert res.mean_s == 3.0 and res.spread == pytest.approx(4 / 3)
    assert len(calls) == 7 and len(setups) == 7                      # setup before every call
    d = res.to_dict()
    assert d["median_s"] == 3.0 and d["runs"] == [3.0, 1.0, 2.0, 5.0, 4.0]
    for bad in (dict(repeats=0), dict(warmup=-1)):
        with pytest.raises(ValueError):
            bench(fn, **bad)
    # real clock: a sleeping function measures at least its sleep
    import time
    r = bench(lambda: time.sleep(0.002), repeats=3, warmup=0)
    assert r.min_s >= 0.0019 and len(r.runs) == 3


def _ticking(order: list, clock, name: str, dt: float):
    """A benchmarked function that logs its name and advances the fake clock by dt."""
    def f():
        order.append(name)
        clock.t += dt
    return f


def test_paired_ab_ratio_and_interleaving():
    clock = FakeClock()
    order = []

    def make(name, dt):
        return _ticking(order, clock, name, dt)

    res = paired_ab(make("a", 3.0), make("b", 1.0), repeats=4, warmup=1, timer=clock)
    assert res.ratio == pytest.approx(3.0) and res.ratios == (3.0,) * 4
    assert res.median_a_s == 3.0 and res.median_b_s == 1.0
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]   # warm-up, AB, BA, AB, BA
    assert res.to_dict()["ratio_a_over_b"] == pytest.approx(3.0)
    # median of ratios is robust to one outlier pair
    seq = iter([1, 1] + [2, 1, 1, 2, 2, 1, 1, 2, 20, 1][:10])
    clock2 = FakeClock()

    def g():
        clock2.t += next(seq)

    r2 = paired_ab(g, g, repeats=5, warmup=1, timer=clock2)
    assert r2.ratio == pytest.approx(2.0)


def test_interleaved_round_robin():
    clock = FakeClock()
    order = []

    def make(name, dt):
        return _ticking(order, clock, name, dt)

    res = interleaved({"x": make("x", 1.0), "y": make("y", 2.0), "z": make("z", 3.0)}, repeats=3, warmup=1,
                      setups={"y": lambda: order.append("setup-y")}, timer=clock)
    assert {k: v.median_s for k, v in res.items()} == {"x": 1.0, "y": 2.0, "z": 3.0}
    runs = [o for o in order if not o.startswith("setup")]
    assert runs[:3] == ["x", "y", "z"] and runs[3:6] == ["y", "z", "x"]
    assert order.count("setup-y") == 4


def test_rotation_and_cold_copies():
    assert cold_copies(10 * 2 ** 20) == math.ceil(COLD_BYTES / (10 * 2 ** 20))
    assert cold_copies(2 * COLD_BYTES) == 1
    assert cold_copies(1000, max_copies=8) == 8
    rot = Rotation.build(lambda i: i, bytes_per_copy=100 * 10 ** 6, max_copies=64)
    assert len(rot) == 4 and rot.cold and rot.total_bytes == 400 * 10 ** 6
    assert [rot.next() for _ in range(6)] == [0, 1, 2, 3, 0, 1]
    assert not Rotation.build(lambda i: i, bytes_per_copy=1000, max_copies=2).cold
    with pytest.raises(ValueError):
        Rotation([])


def test_measure_dram_bandwidth_small():
    bw = measure_dram_bandwidth(64 * 2 ** 20, repeats=2)
    assert 0.5 < bw < 1000


# ============================================================ results and tables
def test_write_results_round_trip(tmp_path):
    r = BenchResult.from_runs([0.3, 0.1, 0.2])
    p = write_results(tmp_path / "sub" / "r.json", {"x": 1, "res": r, "nan": float("nan"), "t": (1, 2)},
                      bandwidth_gbs=33.5)
    d = read_results(p)
    assert d["x"] == 1 and d["res"]["median_s"] == 0.2 and d["res"]["runs"] == [0.3, 0.1, 0.2]
    assert d["nan"] is None and d["t"] == [1, 2]
    m = d["machine"]
    for k in ("cpu_model", "cores", "torch", "numba", "date", "dram_bandwidth_gbs"):
        assert k in m, k
    assert m["dram_bandwidth_gbs"] == 33.5 and m["cores"] >= 1
    assert json.loads(p.read_text()) == d
    assert "dram_bandwidth_gbs" not in machine_info()


def test_format_table_alignment():
    s = format_table([["swa", 1, 12.3456], ["csa", 8, 0.5]], ["layer", "T", "ms"], title="t")
    lines = s.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["layer", "T", "ms"]
    assert len({len(l) for l in lines[1:]}) == 1                   # aligned, equal widths
    assert lines[3].endswith("12.35") and lines[4].endswith("0.500")
    s2 = format_table([{"a": "x", "b": None}, {"a": "yy", "b": 2.0}])
    assert s2.splitlines()[2].split() == ["x", "-"]


# ============================================================ bench driver end to end
def test_bench_layer_main_mini_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench_mini.json"
    rc = driver.main(["--preset", "mini", "--tokens", "1", "--context", "256", "--repeats", "2", "--warmup", "1",
                  "--backends", "reference,fused", "--quant", "none", "--bw-bytes", "64M", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    d = json.loads(out.read_text())
    for k in ("machine", "bandwidth_gbs", "results", "transformers", "speedups", "lm_head", "backends", "notes",
              "context", "tokens", "preset"):
        assert k in d, k
    assert d["preset"] == "mini" and d["context"] == 256 and d["tokens"] == [1]
    assert d["benchmark"] == "bench_layer" and d["model_type"] == "deepseek_v4"
    assert d["bandwidth_gbs_end"] > 0 and set(d["bandwidth_gbs_per_cell"]) >= {"swa T=1", "csa T=1", "hca T=1"}
    assert d["backends"]["reference"] == "ok" and d["backends"]["fused"] == "ok"
    assert d["machine"]["dram_bandwidth_gbs"] == d["bandwidth_gbs"] > 0
    assert {r["layer_type"] for r in d["results"]} == {"swa", "csa", "hca"}
    assert len(d["results"]) == 6
    assert {r["backend"] for r in d["results"]} == {"reference", "fused"}
    for r in d["results"]:
        assert r["quant"] == "none" and r["T"] == 1
        assert len(r["total"]["runs"]) == 2 and r["total"]["median_s"] > 0
        assert r["layer_bytes"] > 0 and r["roofline_pct"] > 0
        assert r["bandwidth_gbs"] == d["bandwidth_gbs_per_cell"][f"{r['layer_type']} T=1"] > 0
        assert r["experts_created_during_timing"] == 0 and r["experts_routed"] >= 1
        stages = set(r["stages"])
        assert {"hc_pre", "qkv_proj_rope", "sparse_attn", "hc_post", "gate", "moe"} <= stages
        assert ("compressor" in stages) == (r["layer_type"] != "swa")
        assert ("indexer" in stages) == (r["layer_type"] == "csa")
        for s in ("moe", "sparse_attn"):
            st = r["stages"][s]
            assert st["median_s"] > 0 and st["bytes"] > 0 and st["gbs"] > 0 and st["roofline_pct"] > 0
    assert len(d["transformers"]) == 3
    for h in d["transformers"]:  # same weights and cache state: bf16 outputs agree with transformers
        assert h["vs_reference_none"]["cosine"] > 0.9999, h
    assert len(d["speedups"]) >= 3 and all(s["speedup"] > 0 for s in d["speedups"])
    assert d["lm_head"] and d["lm_head"][0]["bytes"] > 0
    assert "LAYER TOTAL" in text and "% roofline" in text and "fused" in text


def test_bench_layer_rejects_bad_arguments(capsys):
    main = driver.main
    assert main(["--preset", "mini", "--layer-types", "full", "--bandwidth", "30"]) == 2
    assert main(["--preset", "mini", "--tokens", "3", "--rows-per-seq", "2", "--bandwidth", "30"]) == 2
    assert main(["--preset", "mini", "--quant", "fp8", "--bandwidth", "30"]) == 2
    assert main(["--preset", "mini", "--backends", "xyz", "--bandwidth", "30"]) == 2
    assert main(["--preset", "nope", "--bandwidth", "30"]) == 2
    assert main(["--preset", "mini", "--checkpoint", "/nonexistent", "--bandwidth", "30"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "not both" in err and "nothing to run" in err
    spec = models.get("deepseek_v4")
    assert driver.resolve_backend(spec, "fused")[0] is not None
    assert driver.resolve_backend(spec, "reference")[0] is not None and driver.resolve_backend(spec, "xyz")[0] is None


def test_model_selection_through_the_registry(tmp_path):
    """--preset NAME -> the spec owning NAME; --checkpoint DIR -> its config.json model_type;
    every registered spec with a bench adapter exposes the driver's hooks."""
    from llm_kernels.checkpoint import write_random_checkpoint

    for name in models.preset_names():
        spec, cfg, got, ckpt = driver.select_model(["--preset", name], "flash")
        assert got == name and ckpt is None and spec is models.spec_for_config(cfg)
    spec, _, got, _ = driver.select_model([], "flash")
    assert got == "flash" and spec.model_type == "deepseek_v4"
    spec, _, _, _ = driver.select_model(["--preset=qwen3-mini", "--batch", "1"], "flash")
    assert spec.model_type == "qwen3"
    d = tmp_path / "ck"
    write_random_checkpoint(preset("qwen3-mini", num_hidden_layers=1), d, seed=0, progress=False)
    spec, cfg, got, ckpt = driver.select_model(["--checkpoint", str(d)], "flash")
    assert spec.model_type == "qwen3" and got is None and ckpt == d
    specs = driver.bench_specs()
    assert {s.model_type for s in specs} >= {"deepseek_v4", "qwen3"}
    for s in specs:
        a = driver.adapter_for(s)
        for hook in ("add_arguments", "make_config", "validate", "variants", "estimate_bytes", "run", "report",
                     "plot"):
            assert callable(getattr(a, hook)), (s.model_type, hook)
        assert a.name and a.roofline is not None


def test_json_default_is_the_current_folder(tmp_path, monkeypatch, capsys):
    """Without --json the result goes to ./bench_<preset>.json, never into the repository."""
    monkeypatch.chdir(tmp_path)
    rc = driver.main(["--preset", "mini", "--tokens", "1", "--context", "16", "--layer-types", "swa", "--repeats", "1",
                      "--warmup", "0", "--backends", "reference", "--quant", "none", "--no-transformers",
                      "--no-lm-head", "--bandwidth", "30", "--quiet"])
    assert rc == 0, capsys.readouterr()
    d = json.loads((tmp_path / "bench_mini.json").read_text())
    assert d["bandwidth_source"] == "given (--bandwidth)" and d["bandwidth_gbs_end"] is None
    assert [r["backend"] for r in d["results"]] == ["reference"]


def test_bench_help_names_every_model(capsys):
    with pytest.raises(SystemExit) as e:
        driver.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--tokens" in out and "--layer-types" in out and "qwen3-32b" in out and "--compare" in out
    with pytest.raises(SystemExit):
        driver.main(["--preset", "qwen3-mini", "--help"])
    out = capsys.readouterr().out
    assert "--batch" in out and "--hf-cache" in out and "--tokens" not in out


def test_layer_bytes_w8a8_below_bf16():
    """layer_bytes over all (type, T, quant) combos is positive and w8a8 < bf16."""
    for name, lt, T in itertools.product(("flash", "pro"), ("swa", "csa", "hca"), (1, 2, 8)):
        cfg = preset(name)
        assert 0 < rf.layer_bytes(cfg, lt, T, 4096, "w8a8") < rf.layer_bytes(cfg, lt, T, 4096, "bf16")
