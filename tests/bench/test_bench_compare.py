"""bench --compare / --plot (llm_kernels.bench.compare_runs through the bench driver)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_kernels.bench import compare_runs as cr
from llm_kernels.bench import driver

ROOT = Path(__file__).resolve().parents[2]


def _bench_main():
    return driver.main


def _result(runs_total, runs_moe, preset="flash", backend="fused", repeats=None):
    med = sorted(runs_total)[len(runs_total) // 2]
    mm = sorted(runs_moe)[len(runs_moe) // 2]
    return {"benchmark": "bench_layer", "preset": preset, "context": 4096, "rows_per_seq": 1,
            "repeats": repeats or len(runs_total), "bandwidth_gbs": 40.0, "bandwidth_gbs_end": 41.0,
            "results": [{"layer_type": "swa", "T": 8, "backend": backend, "quant": "w8a8",
                         "total": {"median_s": med, "runs": runs_total}, "roofline_pct": 50.0,
                         "stages": {"moe": {"median_s": mm, "runs": runs_moe, "roofline_pct": 80.0},
                                    "gate": {"median_s": 0.001, "roofline_pct": 20.0}}}]}


@pytest.fixture
def pair(tmp_path):
    a = _result([0.010, 0.011, 0.012, 0.013, 0.014], [0.004] * 5)
    # B: total exactly 0.8x run by run (5/5 faster); moe: 2 faster, 3 slower
    b = _result([0.008, 0.0088, 0.0096, 0.0104, 0.0112], [0.003, 0.003, 0.005, 0.005, 0.005])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    return pa, pb


def test_compare_ratios_and_same_way(pair):
    cmp = cr.compare_results(cr.load_results(pair[0]), cr.load_results(pair[1]))
    (g,) = cmp["groups"]
    rows = {r["stage"]: r for r in g["rows"]}
    tot = rows["LAYER TOTAL"]
    assert tot["median_a_ms"] == pytest.approx(12.0) and tot["median_b_ms"] == pytest.approx(9.6)
    assert tot["ratio"] == pytest.approx(0.8)
    assert tot["pair_min"] == pytest.approx(0.8) and tot["pair_max"] == pytest.approx(0.8)
    assert tot["same_way"] == "5/5 faster" and tot["paired_by"] == "index"
    moe = rows["moe"]
    assert moe["ratio"] == pytest.approx(1.25) and moe["same_way"] == "3/5 slower"
    assert moe["pair_min"] == pytest.approx(0.75) and moe["pair_max"] == pytest.approx(1.25)
    assert rows["gate"]["ratio"] == pytest.approx(1.0) and rows["gate"]["same_way"] == "-"   # no runs


def test_compare_cli_prints_table(pair, capsys):
    assert _bench_main()(["--compare", str(pair[0]), str(pair[1])]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "LAYER TOTAL" in ln)
    assert "0.800" in line and "0.800-0.800" in line and "5/5 faster" in line
    assert "3/5 slower" in out and "paired by run index" in out


def test_all_pairs_when_counts_differ():
    assert sorted(cr.pair_ratios([1.0, 2.0], [2.0, 4.0, 1.0])) == sorted([2.0, 4.0, 1.0, 1.0, 2.0, 0.5])
    assert cr.pair_ratios([1.0, 2.0], [3.0, 4.0]) == [3.0, 2.0]
    assert cr.pair_ratios(None, [1.0]) == []


def test_bad_inputs(tmp_path, pair, capsys):
    with pytest.raises(cr.CompareError, match="not found"):
        cr.load_results(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(cr.CompareError, match="not a readable JSON"):
        cr.load_results(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(cr.CompareError, match="not a bench_layer result"):
        cr.load_results(tmp_path / "other.json")
    pro = tmp_path / "pro.json"
    pro.write_text(json.dumps(_result([0.01], [0.004], preset="pro")))
    with pytest.raises(cr.CompareError, match="preset: A='flash' B='pro'"):
        cr.compare_results(cr.load_results(pair[0]), cr.load_results(pro))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(_result([0.01], [0.004], backend="reference")))
    with pytest.raises(cr.CompareError, match="no .* appears in both"):
        cr.compare_results(cr.load_results(pair[0]), cr.load_results(ref))
    main = _bench_main()
    assert main(["--compare", str(pair[0]), str(tmp_path / "missing.json")]) == 2
    assert main(["--compare", str(pair[0]), str(pro)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "not comparable" in err


def test_plot_writes_png(tmp_path):
    import matplotlib  # noqa: F401  (in the test extra: the plot test must run, not skip)
    out = tmp_path / "p.png"
    src = ROOT / "benchmarks" / "results" / "bench_flash_fused.json"
    assert _bench_main()(["--from-json", str(src), "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, tmp_path, pair):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        cr.require_matplotlib()
    assert _bench_main()(["--from-json", str(pair[0]), "--plot", str(tmp_path / "x.png")]) == 2
