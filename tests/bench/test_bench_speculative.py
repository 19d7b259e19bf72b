"""``bench --speculative mtp``: paired plain / speculative runs (the same ids, asserted in the
benchmark) and the cost-model terms, as a table and JSON."""

from __future__ import annotations

import json

import torch

from llm_kernels import cli
from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.models import preset


def test_bench_speculative_mini(tmp_path, capsys):
    ck = write_random_checkpoint(preset("mini", mtp_layers=1), tmp_path / "m", seed=0, dtype=torch.bfloat16,
                                 progress=False)
    out = tmp_path / "spec.json"
    assert cli.main(["bench", "--checkpoint", str(ck), "--speculative", "mtp", "-n", "4", "-b", "2", "-r", "1",
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "break-even a*" in text and "CPU tier" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [2]
    for r in rows:
        assert r["samples"]["t1"] > 0 and r["samples"]["tv"] > 0 and r["samples"]["td"] > 0
        assert r["t1_ms"] > 0 and r["tv_ms"] > 0 and r["td_ms"] > 0
        assert r["bytes_tv_over_t1"] >= 1 and 0 < r["bytes_td_over_t1"] < 1
        assert abs(r["break_even_acceptance"] - ((r["tv_ms"] + r["td_ms"]) / r["t1_ms"] - 1)) < 1e-9
        k = r["k2"]
        assert set(k["step_ms"]) == {"1", "2", "3"} and all(v > 0 for v in k["step_ms"].values())
        assert abs(k["tv2_over_t1"] - k["step_ms"]["3"] / k["step_ms"]["1"]) < 1e-9
        assert k["bytes_tv2_over_t1"] >= r["bytes_tv_over_t1"]
    assert "Two drafts per step" in text


def test_k2_break_even():
    from llm_kernels.bench.speculative import k2_break_even

    # (1 + a + a^2) t1 = tv2 + 2 td: with t1 = 1, tv2 = 1.5, td = 0.125 the root is a = 0.5
    assert abs(k2_break_even(1.0, 1.5, 0.125) - 0.5) < 1e-12
    assert k2_break_even(1.0, 0.5, 0.1) == 0.0           # cheaper than a plain step: pays at a = 0
    assert k2_break_even(1.0, 3.5, 0.5) != k2_break_even(1.0, 3.5, 0.5)  # nan: never pays

